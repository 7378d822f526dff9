"""The short form of ``benchmarks/load_run.py``: 16 streaming clients for 20 s against the whole mesh
on Ray Serve (the session's Ray, deployed as tests/gateway/test_mesh_serve.py does), with the same
16 images (1 to 13 tiles, drawn with repeats) and ``max_tokens`` 32. Every request must complete:
no 5xx, no transport error, no truncated stream, no timeout, and no 429 (the single-tenant default
has no limit a 16-client load reaches)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.support.mesh import deployed

pytestmark = pytest.mark.ray

CLIENTS = 16
DURATION_S = 20.0


def _load_run():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load_run.py"
    spec = importlib.util.spec_from_file_location("load_run", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_run", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["load_run"])
    module = sys.modules["load_run"]
    return module


@pytest.fixture(scope="module")
def mesh_url(ray_serve, tiny_checkpoint):
    load_run = _load_run()
    cfg = load_run.mesh_config(str(tiny_checkpoint), ray_serve["http_port"], autoscale=False)
    with deployed(cfg):
        yield load_run, f"http://127.0.0.1:{ray_serve['http_port']}/v1"


def test_sixteen_streaming_clients_for_twenty_seconds_all_succeed(mesh_url):
    load_run, url = mesh_url
    results = asyncio.run(load_run.run_load(url, clients=CLIENTS, duration_s=DURATION_S, max_tokens=32))
    assert dict(results.failures) == {}, results.failure_examples
    assert results.rate_limited == 0
    assert results.completed >= CLIENTS  # every client finished at least one request
