"""Faults on the real mesh (Ray Serve, real Redis, real HTTP): a Redis that dies under load and comes
back, an encoder replica killed, a decoder replica killed mid-stream. Nothing hangs, nothing is lost
silently: requests succeed, or fail with 503 / an error event, and the mesh recovers on its own."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import psutil
import pytest
import redis

from tests.support.images import png
from tests.support.mesh import deployed, one_model_mesh_config
from tests.support.own_redis import OwnRedis

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "faults"


@pytest.fixture(scope="module")
def mesh(ray_serve, tiny_checkpoint):
    own = OwnRedis().start()
    url = f"redis://127.0.0.1:{own.port}/0"
    cfg = one_model_mesh_config(
        ray_serve["http_port"],
        tiny_checkpoint,
        MODEL,
        model_extra={"encoder_settings": {"redis": {"url": url, "reprobe_interval_s": 0.5}}},
        redis={"url": url},
    )
    with deployed(cfg):
        yield {"http": f"http://127.0.0.1:{ray_serve['http_port']}", "redis": own}
    own.kill()


def _body(seed: int, max_tokens: int = 4, stream: bool = False, question: str = "What is it?") -> dict:
    uri = "data:image/png;base64," + base64.b64encode(png(480, 320, seed=seed)).decode()
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }


def _post(mesh, body, timeout=120):
    return httpx.post(mesh["http"] + "/v1/chat/completions", json=body, timeout=timeout)


def _encoder_stats():
    from ray import serve

    return serve.get_app_handle(f"encoder-{MODEL}").stats.remote().result(timeout_s=30)


def _kill_replica(app: str) -> None:
    import ray

    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if f"SERVE_REPLICA::{app}#" in a["name"]
    ]
    assert names, f"no replica of {app}"
    for a in names:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)


def _wait_healthy(mesh, seed, deadline_s=120):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if _post(mesh, _body(seed), timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail("the mesh did not recover")


def test_redis_killed_under_load_then_back(mesh):
    own = mesh["redis"]
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(worker: int):
        k = 0
        while not stop.is_set() and k < 40:
            r = _post(mesh, _body(seed=100 + (k % 3), question=f"q{worker}-{k}"))
            statuses.append(r.status_code)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:300]}")
            k += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    own.kill()  # mid-load
    time.sleep(4)
    own.start()  # same port, empty
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(180)
    assert statuses and not failures, failures
    # Caching resumes without a restart: a new image, twice, is a shared-cache write then a hit.
    _post(mesh, _body(seed=777))
    before = _encoder_stats()
    deadline = time.monotonic() + 30
    while redis.Redis(port=own.port).dbsize() == 0 and time.monotonic() < deadline:
        _post(mesh, _body(seed=778))
        time.sleep(0.5)
    assert redis.Redis(port=own.port).dbsize() > 0, "caching did not resume after Redis came back"
    assert _encoder_stats()["shared_writes"] > before["shared_writes"] or before["shared_writes"] > 0


def test_encoder_replica_killed(mesh):
    _kill_replica(f"encoder-{MODEL}")
    started = time.monotonic()
    r = _post(mesh, _body(seed=201), timeout=150)
    assert r.status_code in (200, 503), r.text  # retried onto the replacement, or a clean 503
    assert time.monotonic() - started < 150
    _wait_healthy(mesh, seed=202)


def _started_stream(mesh, seed: int) -> tuple[list[str], threading.Event]:
    """A long streaming request, read on a thread until it ends; returns once 4 events came."""
    events: list[str] = []
    done = threading.Event()

    def read():
        try:
            with httpx.stream(
                "POST",
                mesh["http"] + "/v1/chat/completions",
                json=_body(seed=seed, max_tokens=3000, stream=True),
                timeout=120,
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as exc:
            events.append(f"transport:{type(exc).__name__}")
        finally:
            done.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events) >= 4, "the stream did not start"
    return events, done


def _ended_with_an_error(events: list[str], done: threading.Event) -> None:
    assert done.wait(120), "the stream hung after its decoder died"
    errors = [e for e in events if e.startswith("{") and "error" in json.loads(e)]
    assert errors or any(e.startswith("transport:") for e in events), events[-3:]
    assert not any('"finish_reason": "length"' in e for e in events), "the stream claims to be complete"


def _decoder_engines() -> list[psutil.Process]:
    """The engine processes of this mesh's decoder replicas: children of a replica's process, which
    descends from this test process (it started the session's Ray)."""
    engines = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:decoder-{MODEL}:" in " ".join(proc.cmdline()):
                engines += [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            continue
    return engines


def _exited(proc: psutil.Process, timeout: float = 10.0) -> bool:
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


def test_decoder_replica_killed_mid_stream(mesh):
    events, done = _started_stream(mesh, seed=301)
    engines = _decoder_engines()
    assert len(engines) == 1, engines
    _kill_replica(f"decoder-{MODEL}")
    _ended_with_an_error(events, done)
    assert _exited(engines[0]), "the engine process outlived its replica"
    _wait_healthy(mesh, seed=302)


def test_decoder_engine_process_killed_mid_stream(mesh):
    """The stream ends with an error event, the replica reports itself unhealthy, Serve replaces it."""
    events, done = _started_stream(mesh, seed=311)
    engines = _decoder_engines()
    assert len(engines) == 1, engines
    engines[0].kill()
    _ended_with_an_error(events, done)
    _wait_healthy(mesh, seed=312)
    assert [e.pid for e in _decoder_engines()] != [engines[0].pid]
