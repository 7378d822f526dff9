"""The encoder scales on its own signal (tiles waiting in its batcher, reported through Serve's custom
autoscaling metrics to mesh/autoscaling.py's policy): a burst of new images takes it from one replica
to two (its max_replicas; the second on the other vision node; a target of 3 tiles a replica, which the
node-loss module's lighter load stays under), and it comes back to one after the
burst (a 5 s downscale delay), never leaving its bounds."""

import threading
import time

import pytest

from tests.multinode.test_1_placement import chat, encoder_table, one_encoder, replicas_by_stage
from tests.support.images import png

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


def burst(mesh, stop: threading.Event, seed: int, statuses: list) -> None:
    while not stop.is_set():
        seed += 1
        statuses.append(chat(mesh, png(1024, 1024, seed=seed), timeout=60).status_code)


def encoder_replicas(cluster) -> list[dict]:
    return replicas_by_stage(cluster).get("encoder", [])


def watch(cluster, until, timeout_s: float, trace: list, t0: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = encoder_replicas(cluster)
        trace.append((round(time.monotonic() - t0, 1), len(running)))
        if until(running):
            return True
        time.sleep(0.5)
    return False


def test_encoder_scales_up_on_a_burst_and_back_down(cluster, mesh):
    one_encoder(cluster)
    stop, statuses, trace = threading.Event(), [], []
    t0 = time.monotonic()
    clients = [
        threading.Thread(target=burst, args=(mesh, stop, 50_000 * (i + 1), statuses)) for i in range(6)
    ]
    for c in clients:
        c.start()
    try:
        up = watch(cluster, lambda running: len(running) == 2, 120, trace, t0)
    finally:
        stop.set()
        for c in clients:
            c.join(120)
    assert up, f"the encoder did not scale up: {trace[-10:]}"
    groups = {cluster.group_of(r["node_id"]) for r in encoder_replicas(cluster)}
    assert groups == {"encoder"}
    down = watch(cluster, lambda running: len(running) == 1, 120, trace, t0)
    assert down, f"the encoder did not scale back down: {trace[-10:]}"
    # The stopped replica is gone (no replica left STOPPING for the next module).
    settled = watch(cluster, lambda _: len(encoder_table(cluster)) == 1, 60, [], t0)
    assert settled, encoder_table(cluster)
    assert all(1 <= n <= 2 for _, n in trace), trace
    assert statuses and set(statuses) == {200}, statuses
