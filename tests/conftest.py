"""Fixtures shared by the whole suite: one tiny checkpoint per session, Redis on a test db."""

from __future__ import annotations

import os

import pytest

REDIS_URL = os.environ.get("INTERNVL_MESH_TEST_REDIS", "redis://127.0.0.1:6379/9")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: .ci/run starts it; start it for local runs")
    yield REDIS_URL
    client.flushdb()
    client.close()
