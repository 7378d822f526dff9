"""Fixtures of the embedding-cache suite: its Redis db, cleaned after the run (see ``helpers``)."""

from __future__ import annotations

import pytest

from tests.embedding_cache.helpers import REDIS_URL, RUN_PREFIX
from tests.support.shared_redis import suite_redis


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, "conformance:*", f"{RUN_PREFIX}*") as client:
        yield client
