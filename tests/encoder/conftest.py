"""Shared fixtures of the encoder suite: the tiny checkpoint, and Redis db 7 cleaned after the run.

Every key the suite writes lives in db 7 under a namespace unique to this run (``RUN_NS``) or under the
conformance suite's ``conformance:`` prefix; both are deleted when the session ends.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from services.common.tiny_checkpoint import make_tiny_checkpoint

REDIS_URL = "redis://127.0.0.1:6379/7"
RUN_NS = f"enctest-{uuid.uuid4().hex[:8]}"


def namespace(name: str = "") -> str:
    """A cache namespace owned by this run (cleaned up at the end)."""
    return f"{RUN_NS}-{name or uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def sync_redis():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("the Redis server at 127.0.0.1:6379 is not running (see TOOLING.md)")
    yield client
    for pattern in (f"ivm:emb:v1:{RUN_NS}*", "conformance:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    client.close()
