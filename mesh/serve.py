"""``internvl-mesh serve``: a local Ray, every application of the topology, and a clean shutdown.

The applications deployed are exactly those of ``render_serve_config`` (the config that ``serve
deploy`` and KubeRay use), built through their ``import_path`` builders. ``serve.run`` returns once a
deployment's replicas have finished their constructors, which load the weights and warm up, so the
mesh is ready when this prints its addresses. SIGTERM / Ctrl-C: Serve stops taking new requests and
gives running streams each deployment's ``graceful_shutdown_timeout_s`` to finish.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from mesh.topology import MeshConfig, render_serve_config
from services.common.context import MESH_SECRET_ENV, ContextSigner

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def import_builder(import_path: str) -> Callable[[dict[str, Any]], Any]:
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def deploy(serve_config: dict[str, Any]) -> None:
    """Deploy every application of a rendered Serve config into the running Serve instance."""
    from ray import serve

    for app in serve_config["applications"]:
        builder = import_builder(app["import_path"])
        log.info("deploying %s", app["name"])
        serve.run(builder(app["args"]), name=app["name"], route_prefix=app.get("route_prefix"))


def first_replicas_cpus(serve_config: dict[str, Any]) -> float:
    """The CPUs that the first replicas of every deployment ask Ray for (``min_replicas``, at least one,
    times ``num_cpus``, which Ray defaults to one)."""
    total = 0.0
    for app in serve_config["applications"]:
        options = app["args"].get("deployment_options") or {}
        scaling = options.get("autoscaling_config") or {}
        replicas = max(1, int(scaling.get("min_replicas", options.get("num_replicas", 1)) or 1))
        total += replicas * float((options.get("ray_actor_options") or {}).get("num_cpus", 1.0))
    return total


def local_num_cpus(serve_config: dict[str, Any], cores: int | None = None) -> int:
    """Logical CPUs for a Ray that ``serve`` starts on this machine: its cores, or, where the first
    replicas ask for more (four deployments of one CPU each on a two-core laptop), that many, so the
    whole mesh is scheduled and shares the cores instead of waiting forever for a CPU."""
    return max(cores or os.cpu_count() or 1, math.ceil(first_replicas_cpus(serve_config)))


def _mesh_secret(address: str | None) -> None:
    """The mesh secret the replicas sign and verify request contexts with. A Ray started here inherits
    this process's environment: without a secret of the operator's, one is made for this run. A Ray
    cluster started elsewhere must have it in the environment of every node already."""
    if os.environ.get(MESH_SECRET_ENV):
        return
    if address is not None:
        log.warning(
            "%s is not set here: the cluster's nodes must have it, or no replica starts", MESH_SECRET_ENV
        )
        return
    os.environ[MESH_SECRET_ENV] = ContextSigner.new_secret()
    log.info("made a mesh secret for this run's local Ray (set %s to choose it)", MESH_SECRET_ENV)


def start_ray(
    cfg: MeshConfig, *, num_cpus: int | None = None, num_gpus: int | None = None, address: str | None = None
) -> None:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    _mesh_secret(address)
    serve_config = render_serve_config(cfg)
    if address is None and num_cpus is None:
        num_cpus = local_num_cpus(serve_config)
        if num_cpus > (os.cpu_count() or 1):
            log.warning(
                "the deployments' first replicas ask for more CPUs than this machine's %d cores: "
                "the local Ray is given %d logical CPUs and they share the cores",
                os.cpu_count() or 1,
                num_cpus,
            )
    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _temp_dir=None if address else tempfile.mkdtemp(prefix="ivm-ray-", dir="/tmp"),
            logging_level="warning",
        )
    http = serve_config["http_options"]
    grpc = serve_config.get("grpc_options")
    serve.start(
        http_options=HTTPOptions(host=http["host"], port=http["port"]),
        grpc_options=gRPCOptions(**grpc) if grpc else None,
    )


def run(cfg: MeshConfig, *, announce: Callable[[str], None] = print) -> None:
    """Start Ray and Serve, deploy the mesh, wait for SIGTERM/SIGINT, then shut down cleanly."""
    import ray
    from ray import serve

    start_ray(cfg)
    serve_config = render_serve_config(cfg)
    deploy(serve_config)
    g = cfg.gateway
    announce(f"internvl-mesh: ready. HTTP (OpenAI API) on http://{g.host}:{g.http_port}/v1")
    if g.grpc_port:
        announce(f"internvl-mesh: gRPC (internvl.gateway.v1.GatewayService) on {g.host}:{g.grpc_port}")
    if g.metrics_port:
        announce(f"internvl-mesh: metrics (Prometheus) on http://{g.host}:{g.metrics_port}/metrics")
    if g.serve_grpc_port:
        announce(
            f"internvl-mesh: Ray Serve's gRPC proxy to the internal services on every interface, port "
            f"{g.serve_grpc_port}: unauthenticated, for development only"
        )
    announce("internvl-mesh: models: " + ", ".join(m.name for m in cfg.models))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    announce("internvl-mesh: shutting down; letting running requests finish")
    # The gateway first: deleting an application stops routing new requests to it and lets its
    # replicas finish what they are running (up to graceful_shutdown_timeout_s) while the encoders
    # and decoders they stream from are still up; then the rest, in reverse order of deployment.
    for app in reversed(serve_config["applications"]):
        serve.delete(app["name"], _blocking=True)
    serve.shutdown()
    ray.shutdown()
    announce("internvl-mesh: stopped")
