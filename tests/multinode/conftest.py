"""One multi-node Ray cluster for every test of this folder: a head in the CPU pool and worker nodes
of the vision and decoder pools, started from the chart's worker groups (tests/support/ray_cluster.py),
with the Serve config that ``internvl-mesh config render`` prints deployed by ``serve deploy``.

Nodes: ``cpu-0`` (head: gateway, preprocess), ``vision-0`` and ``vision-1`` (one encoder replica each:
the encoder's second replica when it scales up, the spare when a node is lost) and ``decoder-0`` (two
decoder replicas). The modules run in name order and share the deployment; the node-loss module runs
last, since it stops nodes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from mesh.pools import pool_overrides
from tests.support.ports import free_port
from tests.support.ray_cluster import ROOT, RayCluster

NODES = [("cpu-0", "cpu"), ("vision-0", "encoder"), ("vision-1", "encoder"), ("decoder-0", "decoder")]
MODEL = "tiny-mn"


def render(checkpoint, http_port: int, redis_url: str, key_prefix: str, *extra: str) -> dict:
    """The Serve config exactly as ``internvl-mesh config render`` prints it."""
    sets = [
        f"models.0.name={MODEL}",
        "models.0.dtype=float32",
        "models.0.device=cpu",
        f"gateway.http_port={http_port}",
        "gateway.grpc_port=0",
        "gateway.metrics_port=0",
        f"redis.key_prefix={key_prefix}",
        *pool_overrides(),
        *extra,
    ]
    command = [sys.executable, "-m", "mesh.cli", "config", "render", "--model", str(checkpoint)]
    for s in sets:
        command += ["--set", s]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return yaml.safe_load(out.stdout)


# Small: half a logical CPU each; two decoder replicas for the routing test, the encoder between one
# and two replicas for the autoscaling test (a short downscale delay).
DEPLOYMENTS = [
    *(f"{d}.num_cpus=0.5" for d in ("preprocess_deployment", "gateway_deployment")),
    "models.0.encoder.num_cpus=0.5",
    "models.0.decoder.num_cpus=0.5",
    *(f"{d}.autoscaling.max_replicas=1" for d in ("preprocess_deployment", "gateway_deployment")),
    "models.0.decoder.autoscaling.min_replicas=2",
    "models.0.decoder.autoscaling.max_replicas=2",
    "models.0.encoder.autoscaling.min_replicas=1",
    "models.0.encoder.autoscaling.max_replicas=2",
    "models.0.encoder.autoscaling.signal_targets.tiles_waiting=3",
    # On this CPU the tiny vision tower is far faster than tiling and decoding, so tiles never wait
    # for it; a wide batching window (tiles wait up to 0.5 s for company, as a GPU deployment may
    # choose for fuller forwards) makes the queue that the encoder scales on measurable.
    "models.0.encoder_settings.batching.max_wait_ms=500",
    "models.0.encoder_settings.batching.max_batch_tiles=256",
    "models.0.encoder.autoscaling.look_back_period_s=4",
    "models.0.encoder.autoscaling.upscale_delay_s=1",
    "models.0.encoder.autoscaling.downscale_delay_s=5",
]


@pytest.fixture(scope="session")
def cluster():
    nodes = RayCluster(NODES)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture(scope="session")
def mesh(cluster, tiny_checkpoint, redis_url):
    """The mesh deployed onto the cluster. Every node shares one network namespace here, so the one
    change to the rendered config is ``proxy_location: HeadOnly`` (one HTTP proxy on the port; on
    Kubernetes every pod has its own address and the chart keeps ``EveryNode``)."""
    http_port = free_port()
    key_prefix = f"mn{os.getpid()}"
    config = render(tiny_checkpoint, http_port, redis_url, key_prefix, f"redis.url={redis_url}", *DEPLOYMENTS)
    config["proxy_location"] = "HeadOnly"
    cluster.serve_deploy(config)
    names = [a["name"] for a in config["applications"]]
    cluster.wait_running(names)
    yield {
        "config": config,
        "base": f"http://127.0.0.1:{http_port}",
        "model": MODEL,
        "apps": names,
        "key_prefix": key_prefix,
        "redis_url": redis_url,
    }
