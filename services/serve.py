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
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from services.topology import MeshConfig, render_serve_config

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


def start_ray(
    cfg: MeshConfig, *, num_cpus: int | None = None, num_gpus: int | None = None, address: str | None = None
) -> None:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    serve_config = render_serve_config(cfg)
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
