"""A node lost under load. Runs last: it stops nodes.

The vision node that runs the encoder is stopped (every process of it at once) while clients send
new images: an embedding in flight there is tried once more (embedding is idempotent) and Serve
replaces the replica on the spare vision node; every request ends, with 200 or a clear error, and
requests succeed once the replacement runs; every request that completed has its usage record. Then
the decoder node goes while streams run on it: each stream ends with an error event, and with no node
of the pool left a new request gets the documented answer (503 or its own deadline, 504), never a hang.
"""

import json
import threading
import time

import httpx
import pytest
import redis

from tests.multinode.test_1_placement import chat, encoder_table, one_encoder, replicas_by_stage
from tests.support.images import png

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

CLEAR = {200, 503, 504}


def node_named(cluster, node_id: str):
    return next(n for n in cluster.nodes.values() if n.node_id == node_id)


def load(mesh, stop: threading.Event, results: list, seed0: int) -> None:
    seed = seed0
    while not stop.is_set():
        seed += 1
        start = time.monotonic()
        try:
            r = chat(mesh, png(320, 240, seed=seed), timeout=60)
            body = r.json()
            results.append({"start": start, "end": time.monotonic(), "status": r.status_code, "body": body})
        except httpx.HTTPError as exc:  # a hang or a dropped connection: the test fails on it
            results.append({"start": start, "end": time.monotonic(), "status": None, "body": repr(exc)})


def usage_ids(mesh) -> dict[str, str]:
    client = redis.Redis.from_url(mesh["redis_url"], decode_responses=True)
    entries = client.xrange(f"{mesh['key_prefix']}:usage")
    return {e["request_id"]: e["status"] for _, e in entries}


def test_vision_node_lost_under_load(cluster, mesh):
    encoders = one_encoder(cluster)
    lost = node_named(cluster, encoders[0]["node_id"])
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=load, args=(mesh, stop, results, 10_000 * (i + 1))) for i in range(2)]
    for c in clients:
        c.start()
    time.sleep(4)
    killed_at = time.monotonic()
    lost.kill()
    deadline = killed_at + 150
    replaced_at, seen = None, []
    while time.monotonic() < deadline:
        seen.append((round(time.monotonic() - killed_at), encoder_table(cluster)))
        now = replicas_by_stage(cluster).get("encoder", [])
        if replaced_at is None and now and now[0]["node_id"] != lost.node_id:
            replaced_at = time.monotonic()
            assert cluster.group_of(now[0]["node_id"]) == "encoder"  # the spare vision node
        if replaced_at and sum(1 for r in results if r["start"] > replaced_at and r["status"] == 200) >= 3:
            break
        time.sleep(1)
    stop.set()
    for c in clients:
        c.join(120)
    assert replaced_at is not None, f"the encoder was not replaced on the spare vision node: {seen[::5]}"
    assert all(r["status"] in CLEAR for r in results), [r for r in results if r["status"] not in CLEAR]
    for r in results:
        if r["status"] != 200:
            assert r["body"]["error"]["type"] and r["body"]["error"]["message"], r
    in_flight = [r for r in results if r["start"] < killed_at < r["end"]]
    assert in_flight, "no request was in flight when the node stopped"
    after = [r for r in results if r["start"] > replaced_at and r["status"] == 200]
    assert len(after) >= 3, [(r["status"], r["body"]) for r in results if r["start"] > replaced_at]
    completed = {r["body"]["id"] for r in results if r["status"] == 200}
    deadline = time.monotonic() + 30
    while not completed <= set(usage_ids(mesh)) and time.monotonic() < deadline:
        time.sleep(1)
    assert completed <= set(usage_ids(mesh)), completed - set(usage_ids(mesh))


def stream_events(mesh, events: list, done: threading.Event) -> None:
    body = {
        "model": mesh["model"],
        "max_tokens": 3000,
        "temperature": 1.0,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }
    try:
        with httpx.stream("POST", mesh["base"] + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as exc:
        events.append(f"client error: {exc!r}")
    finally:
        done.set()


def test_decoder_node_lost_streams_end_and_the_empty_pool_answers(cluster, mesh):
    decoders = replicas_by_stage(cluster)["decoder"]
    lost = node_named(cluster, decoders[0]["node_id"])
    events: list[str] = []
    done = threading.Event()
    reader = threading.Thread(target=stream_events, args=(mesh, events, done))
    reader.start()
    deadline = time.monotonic() + 60
    while len(events) < 3 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(events) >= 3 and not done.is_set(), events[-3:]
    lost.kill()
    reader.join(90)
    assert done.is_set(), "the stream hung after its decoder's node stopped"
    assert events[-1] == "[DONE]" or events[-1].startswith("data: ") or "error" in events[-1], events[-2:]
    errors = [json.loads(e) for e in events if e.startswith("{") and '"error"' in e]
    assert errors and errors[-1]["error"]["message"], events[-3:]
    # No decoder node is left: a new request ends within its own deadline with a clear answer.
    start = time.monotonic()
    r = chat(mesh, png(320, 240, seed=11), timeout=10)
    assert time.monotonic() - start < 40
    assert r.status_code in (503, 504), r.text
    assert r.json()["error"]["message"]
