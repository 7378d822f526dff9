"""Fixtures of the tenancy suite: Redis db 11 under a key prefix unique to this run, deleted at the end.

``OwnRedis`` is a redis-server owned by one test (its own port, no persistence), for outages: the test
kills, pauses or restarts it by its PID.
"""

from __future__ import annotations

import uuid

import pytest

from gateway.tenancy import RedisLimiter, Tenant, TenantLimits
from tests.support.own_redis import OwnRedis, suite_redis

REDIS_URL = "redis://127.0.0.1:6379/11"
RUN_PREFIX = f"ivm:limtest:{uuid.uuid4().hex[:8]}:"


def make_tenant(name: str | None = None, **limits) -> Tenant:
    """A tenant with a fresh name (so tests never share counters) and the given limits."""
    return Tenant(name=name or f"t{uuid.uuid4().hex[:10]}", limits=TenantLimits(**limits))


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, f"{RUN_PREFIX}*") as client:
        yield client


@pytest.fixture
async def limiters(sync_redis):
    """A factory of RedisLimiters on db 11, each with its own connection pool; closed after the test."""
    made: list[RedisLimiter] = []

    def make(**kwargs) -> RedisLimiter:
        kwargs.setdefault("prefix", RUN_PREFIX)
        limiter = RedisLimiter.from_url(REDIS_URL, op_timeout_s=2.0, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


@pytest.fixture
def own_redis():
    server = OwnRedis().start()
    yield server
    server.kill()
