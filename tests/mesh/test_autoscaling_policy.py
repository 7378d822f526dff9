"""The stage-signal autoscaling policy: replicas = the largest demand of the signals (their sum over
the replicas / the per-replica target); the rendered config names it only where targets are set."""

from types import SimpleNamespace

import pytest

from mesh.autoscaling import SignalPolicy, desired_replicas
from mesh.cli import _mesh_config
from mesh.topology import render_serve_config
from services.common.errors import MeshError


def ctx(metrics, current=1):
    return SimpleNamespace(
        aggregated_metrics=metrics, current_num_replicas=current, deployment_name="Encoder", policy_state={}
    )


def test_the_largest_demand_of_the_signals_wins():
    assert desired_replicas({"tiles_waiting": 130.0}, {"tiles_waiting": 64}) == 3
    assert (
        desired_replicas(
            {"waiting_tokens": 100.0, "kv_usage": 1.7}, {"waiting_tokens": 4096, "kv_usage": 0.8}
        )
        == 3
    )
    assert desired_replicas({}, {"tiles_waiting": 64}) == 0  # no load: Serve's min_replicas applies


def test_policy_sums_each_signal_over_the_replicas():
    policy = SignalPolicy({"tiles_waiting": 10})
    desired, state = policy(ctx({"tiles_waiting": {"r1": 12.0, "r2": 9.0}}, current=2))
    assert desired == 3 and state == {"totals": {"tiles_waiting": 21.0}, "desired": 3}
    assert policy(ctx(None))[0] == 0
    with pytest.raises(ValueError):
        SignalPolicy({"tiles_waiting": 0})


def _rendered(checkpoint, *overrides):
    return render_serve_config(_mesh_config(checkpoint, None, None, None, list(overrides)))


def test_rendered_policies_per_stage(tiny_checkpoint):
    apps = {a["name"].split("-")[0]: a for a in _rendered(tiny_checkpoint)["applications"]}
    scaling = {k: a["args"]["deployment_options"]["autoscaling_config"] for k, a in apps.items()}
    assert scaling["encoder"]["policy"]["policy_kwargs"] == {"targets": {"tiles_waiting": 64.0}}
    assert scaling["preprocess"]["policy"]["policy_kwargs"] == {"targets": {"queue_depth": 8.0}}
    assert "policy" not in scaling["gateway"] and "policy" not in scaling["decoder"]


def test_unknown_signal_is_refused(tiny_checkpoint):
    with pytest.raises(MeshError, match="unknown signals"):
        _rendered(tiny_checkpoint, "models.0.encoder.autoscaling.signal_targets.tokens_waiting=3")
