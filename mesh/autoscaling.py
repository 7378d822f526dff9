"""Autoscaling each stage on its own signal, through Ray Serve's custom autoscaling API.

Each replica reports its stage's load from ``record_autoscaling_stats`` (Serve calls it on the replica
and aggregates the values over ``look_back_period_s``); the policy below, named in the deployment's
``autoscaling_config.policy``, turns the summed signal into a replica count. Serve applies
``min_replicas`` / ``max_replicas`` and the up/down-scale delays around it, as for its own policy.

| stage | signal (per replica) | metric |
|---|---|---|
| encoder | tiles waiting in the batcher + tiles being encoded | ``tiles_waiting`` |
| decoder | waiting prompt tokens, and KV-cache usage | ``waiting_tokens``, ``kv_usage`` |
| preprocess | images queued for the workers | ``queue_depth`` |

This module imports nothing heavy: Serve pickles the policy by value into its controller.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("ray.serve")

POLICY = "mesh.autoscaling.SignalPolicy"
# The signals a stage's replicas report (record_autoscaling_stats), by stage.
SIGNALS = ("tiles_waiting", "queue_depth", "waiting_tokens", "kv_usage")


def desired_replicas(totals: dict[str, float], targets: dict[str, float]) -> int:
    """Enough replicas that no signal's total exceeds its per-replica target: the largest demand of
    the signals (Serve's bounds and delays apply on top)."""
    return max((math.ceil(totals.get(name, 0.0) / target) for name, target in targets.items()), default=0)


class SignalPolicy:
    """``autoscaling_config.policy``: ``{"policy_function": "mesh.autoscaling.SignalPolicy",
    "policy_kwargs": {"targets": {"tiles_waiting": 16}}}``: replicas = max over the signals of
    ceil(sum over replicas / target per replica)."""

    def __init__(self, targets: dict[str, float]):
        if not targets or any(float(t) <= 0 for t in targets.values()):
            raise ValueError(f"targets must name at least one signal with a target > 0, got {targets!r}")
        self.targets = {name: float(t) for name, t in targets.items()}

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        totals = {name: float(sum((metrics.get(name) or {}).values())) for name in self.targets}
        desired = desired_replicas(totals, self.targets)
        if desired != (ctx.policy_state or {}).get("desired"):
            log.info(
                "%s: signals %s (targets %s): %d replicas", ctx.deployment_name, totals, self.targets, desired
            )
        return desired, {"totals": totals, "desired": desired}


def policy_config(targets: dict[str, float]) -> dict[str, Any]:
    """The ``autoscaling_config.policy`` entry of a rendered deployment."""
    return {"policy_function": POLICY, "policy_kwargs": {"targets": dict(targets)}}
