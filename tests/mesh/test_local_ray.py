"""The Ray that `serve` starts on the machine it runs on has room for the first replica of every
deployment, however few cores the machine has (the README's `make serve` on a two-core laptop)."""

from mesh.cli import _mesh_config
from mesh.serve import first_replicas_cpus, local_num_cpus
from mesh.topology import render_serve_config


def _rendered(checkpoint, *overrides):
    return render_serve_config(_mesh_config(checkpoint, None, None, None, list(overrides)))


def test_default_deployments_fit_a_two_core_machine(tiny_checkpoint):
    defaults = _rendered(tiny_checkpoint)
    assert first_replicas_cpus(defaults) == 4.0  # preprocess, encoder, decoder, gateway: one CPU each
    assert local_num_cpus(defaults, cores=2) == 4
    assert local_num_cpus(defaults, cores=16) == 16  # a big machine keeps its cores


def test_replicas_and_fractions_count(tiny_checkpoint):
    more = _rendered(tiny_checkpoint, "models.0.decoder.autoscaling.min_replicas=2")
    assert first_replicas_cpus(more) == 5.0
    halves = _rendered(
        tiny_checkpoint,
        "models.0.decoder.num_cpus=0.5",
        "models.0.encoder.num_cpus=0.5",
        "preprocess_deployment.num_cpus=0.5",
        "gateway_deployment.num_cpus=0.75",
    )
    assert first_replicas_cpus(halves) == 2.25
    assert local_num_cpus(halves, cores=1) == 3
