"""Fixtures of the embedding-cache suite: Redis db 8, cleaned after the run.

Every key the suite writes lives in db 8 under the conformance suite's ``conformance:`` prefix or
under ``RUN_PREFIX`` (a key prefix unique to this run); both are deleted when the session ends.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.own_redis import suite_redis

REDIS_URL = "redis://127.0.0.1:6379/8"
RUN_PREFIX = f"ecachetest-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, "conformance:*", f"{RUN_PREFIX}*") as client:
        yield client
