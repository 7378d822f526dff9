"""LocalLimiter: the same accounting in process memory, on a hand-driven clock (no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.tenancy import REASON_CONCURRENCY, REASON_DAILY, REASON_RATE, REASON_TOKENS, LocalLimiter
from services.common.errors import ResourceExhausted
from tests.gateway.tenancy.helpers import make_tenant


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime(2031, 1, 1, 12, 0, tzinfo=UTC)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


def local(clock: Clock, **kw) -> LocalLimiter:
    return LocalLimiter(clock=lambda: clock.t, utcnow=lambda: clock.wall, **kw)


async def refused(limiter, tenant, tokens: int = 0) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        await limiter.admit(tenant, tokens)
    return err.value


async def test_rate_bucket(clock):
    limiter = local(clock)
    tenant = make_tenant(requests_per_s=2, burst=2, tokens_per_min=10**6)
    await limiter.admit(tenant, 0)
    await limiter.admit(tenant, 0)
    err = await refused(limiter, tenant)
    assert err.reason == REASON_RATE and err.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    await limiter.admit(tenant, 0)


async def test_tokens_reserve_refund_and_retry_after(clock):
    limiter = local(clock)
    tenant = make_tenant(requests_per_s=100, tokens_per_min=600, daily_token_quota=10**6)
    adm = await limiter.admit(tenant, 500)
    err = await refused(limiter, tenant, 200)
    assert err.reason == REASON_TOKENS and err.retry_after == pytest.approx(10.0)  # 100 short at 10/s
    await adm.complete(100)
    await limiter.admit(tenant, 500)
    clock.advance(60)
    await limiter.admit(tenant, 600)


async def test_concurrency_and_leases(clock):
    limiter = local(clock, lease_s=10)
    tenant = make_tenant(requests_per_s=100, max_concurrent=1, tokens_per_min=10**6)
    adm = await limiter.admit(tenant, 1)
    assert adm.backend == "local"
    assert (await refused(limiter, tenant)).reason == REASON_CONCURRENCY
    await adm.release()
    await limiter.admit(tenant, 1)  # leaked
    clock.advance(10.1)
    await limiter.admit(tenant, 1)


async def test_daily_quota_and_day_rollover(clock):
    limiter = local(clock)
    tenant = make_tenant(requests_per_s=100, tokens_per_min=10**6, daily_token_quota=100)
    adm = await limiter.admit(tenant, 80)
    err = await refused(limiter, tenant, 30)
    assert err.reason == REASON_DAILY and err.retry_after == pytest.approx(12 * 3600)
    await adm.complete(50)
    await limiter.admit(tenant, 50)
    clock.advance(12 * 3600)
    await limiter.admit(tenant, 100)


async def test_scale_shares_limits_between_replicas(clock):
    limiter = local(clock, scale=0.25)
    tenant = make_tenant(requests_per_s=100, burst=100, max_concurrent=8, tokens_per_min=4000)
    held = [await limiter.admit(tenant, 0) for _ in range(2)]  # 8 x 0.25
    assert (await refused(limiter, tenant)).reason == REASON_CONCURRENCY
    for adm in held:
        await adm.release()
    # A request bigger than the replica's share (1000 tokens/min) but within the tenant's limit passes
    # when the share is untouched, and only then.
    await limiter.admit(tenant, 3000)
    assert (await refused(limiter, tenant, 10)).reason == REASON_TOKENS
