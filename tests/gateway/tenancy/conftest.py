"""Fixtures of the tenancy suite: its Redis db under the run's key prefix, deleted at the end (see
``helpers``), and Redis limiters on it. Outage tests use the suite-wide ``own_redis`` fixture."""

from __future__ import annotations

import pytest

from gateway.tenancy import RedisLimiter
from tests.gateway.tenancy.helpers import REDIS_URL, RUN_PREFIX
from tests.support.shared_redis import suite_redis


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, f"{RUN_PREFIX}*") as client:
        yield client


@pytest.fixture
async def limiters(sync_redis):
    """A factory of RedisLimiters on the suite's db, each with its own connection pool; closed after
    the test."""
    made: list[RedisLimiter] = []

    def make(**kwargs) -> RedisLimiter:
        kwargs.setdefault("prefix", RUN_PREFIX)
        limiter = RedisLimiter.from_url(REDIS_URL, op_timeout_s=2.0, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()
