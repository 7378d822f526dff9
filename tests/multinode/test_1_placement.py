"""Every replica runs on a node of its pool (Serve's and Ray's state APIs agree on where), and a chat
request with an image crosses the nodes: gateway and preprocess on the head, the encoder on a vision
node writing the embedding to Redis, the decoder on the decoder node reading it back."""

import base64
import time

import httpx
import pytest
import redis

from mesh.pools import DEPLOYMENT_GROUP
from tests.support.images import png

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


def replicas_by_stage(cluster) -> dict[str, list[dict]]:
    """Serve's replicas, by stage (the application's name up to its model: ``encoder-tiny-mn`` ->
    ``encoder``), each with the node Serve says it runs on and its actor id."""
    out: dict[str, list[dict]] = {}
    for name, app in cluster.serve_applications().items():
        stage = name.split("-")[0]
        for deployment in app["deployments"].values():
            out.setdefault(stage, []).extend(r for r in deployment["replicas"] if r["state"] == "RUNNING")
    return out


def encoder_table(cluster) -> list[tuple[str, str]]:
    """Every encoder replica Serve knows, with its state and node group (for failure messages)."""
    for name, app in cluster.serve_applications().items():
        if name.startswith("encoder-"):
            d = next(iter(app["deployments"].values()))
            return [(r["state"], cluster.name_of(r.get("node_id") or "")) for r in d["replicas"]]
    return []


def one_encoder(cluster, timeout_s: float = 120.0) -> list[dict]:
    """The encoder's replicas once it runs exactly one and holds no other (an earlier test's load may
    have scaled it up: it comes back down after its downscale delay); fails past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = replicas_by_stage(cluster).get("encoder", [])
        if len(running) == 1 and len(encoder_table(cluster)) == 1:
            return running
        if time.monotonic() > deadline:
            raise AssertionError(f"the encoder did not settle at one replica: {encoder_table(cluster)}")
        time.sleep(0.5)


def chat(
    mesh, image: bytes, question: str = "What is in this image?", timeout: float = 120, **extra
) -> httpx.Response:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": mesh["model"],
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        **extra,
    }
    return httpx.post(
        mesh["base"] + "/v1/chat/completions", json={**body, "timeout": timeout}, timeout=timeout + 30
    )


def test_every_replica_runs_on_a_node_of_its_pool(cluster, mesh):
    from ray.util.state import list_actors

    replicas = replicas_by_stage(cluster)
    assert set(replicas) == set(DEPLOYMENT_GROUP)
    actors = {
        a.actor_id: a.node_id
        for a in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    }
    for stage, running in replicas.items():
        assert running, stage
        for replica in running:
            assert actors[replica["actor_id"]] == replica["node_id"]  # Ray agrees with Serve
            assert cluster.group_of(replica["node_id"]) == DEPLOYMENT_GROUP[stage], (stage, replica)
    assert len(replicas["decoder"]) == 2
    nodes = {r["node_id"] for running in replicas.values() for r in running}
    assert len(nodes) >= 3  # the head, a vision node, the decoder node


def test_a_request_crosses_the_nodes(mesh):
    r = chat(mesh, png(640, 480, seed=11))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens_details"]["image_tokens"] > 0
    # The encoder (a vision node) wrote the embedding to Redis; the decoder (the decoder node) read it.
    client = redis.Redis.from_url(mesh["redis_url"])
    assert client.keys(f"{mesh['key_prefix']}:emb:*")
    again = chat(mesh, png(640, 480, seed=11), "And now?")
    assert again.status_code == 200, again.text
