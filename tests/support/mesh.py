"""Deploying the whole mesh into the session's Ray Serve for a test module, from the same rendered
Serve config that `internvl-mesh serve`, `serve deploy` and KubeRay use, and removing it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# One replica per deployment, half a logical CPU each: four services fit the session's Ray.
ONE = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.5}


def one_model_mesh_config(
    http_port: int, checkpoint, model: str, *, model_extra: dict | None = None, **sections
):
    """A MeshConfig for one tiny model, fp32 on CPU, one replica each, without the gateway's gRPC and
    metrics listeners; ``sections`` add or override top-level sections (``gateway`` entries are merged
    into the test defaults)."""
    return mesh_config(http_port, [model_entry(model, checkpoint, **(model_extra or {}))], **sections)


def model_entry(model: str, checkpoint, **extra) -> dict[str, Any]:
    """One model of the mesh: ``checkpoint`` served as ``model``, fp32 on CPU, one replica each."""
    return {
        "name": model,
        "path": str(checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "encoder": ONE,
        "decoder": ONE,
        **extra,
    }


def mesh_config(http_port: int, models: list[dict[str, Any]], **sections):
    """A MeshConfig for ``models`` (entries as :func:`model_entry` makes them), as
    :func:`one_model_mesh_config` describes."""
    from mesh.topology import MeshConfig
    from services.common.config import build

    gateway = {"http_port": http_port, "grpc_port": 0, "metrics_port": 0, **sections.pop("gateway", {})}
    data: dict[str, Any] = {
        "models": models,
        "preprocess_deployment": ONE,
        "gateway_deployment": ONE,
        "gateway": gateway,
        **sections,
    }
    return build(MeshConfig, data, "test")


@contextmanager
def deployed(cfg) -> Iterator[dict[str, Any]]:
    """Deploy every application of ``cfg``; delete them, gateway first, on exit."""
    from ray import serve

    from mesh.serve import deploy
    from mesh.topology import render_serve_config

    config = render_serve_config(cfg)
    deploy(config)
    try:
        yield config
    finally:
        for app in reversed(config["applications"]):
            serve.delete(app["name"])
