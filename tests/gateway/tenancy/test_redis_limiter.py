"""RedisLimiter on a real Redis (db 11): every limit, reservations and refunds, leases, the daily quota,
retry_after, and two limiter instances (two gateway replicas) sharing the same counters exactly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.tenancy import REASON_CONCURRENCY, REASON_DAILY, REASON_RATE, REASON_TOKENS
from services.common.errors import InvalidArgument, ResourceExhausted
from tests.gateway.tenancy.helpers import REDIS_URL, RUN_PREFIX, make_tenant

BIG = {"tokens_per_min": 10**9, "daily_token_quota": 10**12, "max_concurrent": 10_000}


async def refused(limiter, tenant, tokens: int = 0) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        await limiter.admit(tenant, tokens)
    assert err.value.http_status == 429 and err.value.code == "RESOURCE_EXHAUSTED"
    assert err.value.retry_after is not None and err.value.retry_after > 0
    return err.value


async def test_requests_per_s_bucket_with_burst_and_retry_after(limiters):
    limiter = limiters()
    tenant = make_tenant(requests_per_s=4, burst=3, **BIG)
    for _ in range(3):
        await (await limiter.admit(tenant, 0)).complete(0)
    err = await refused(limiter, tenant)
    assert err.reason == REASON_RATE
    assert 0 < err.retry_after <= 0.25 + 0.01  # one request refills in 1/4 s
    await asyncio.sleep(err.retry_after + 0.02)
    await (await limiter.admit(tenant, 0)).complete(0)


async def test_tokens_per_min_reserves_and_refunds(limiters, sync_redis):
    limiter = limiters()
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=1200, daily_token_quota=10**9)
    first = await limiter.admit(tenant, 1000)  # prompt + max_tokens reserved
    err = await refused(limiter, tenant, 300)
    assert err.reason == REASON_TOKENS
    # 300 - ~200 left, refilled at 20 tokens/s: about 5 s.
    assert 4.5 <= err.retry_after <= 5.1
    await first.complete(400)  # used 400 of the 1000 reserved: 600 come back
    second = await limiter.admit(tenant, 750)
    await refused(limiter, tenant, 100)  # ~50 left
    await second.release()  # all of 750 comes back
    third = await limiter.admit(tenant, 790)
    assert third.backend == "redis" and third.reserved_tokens == 790
    await third.complete(790)
    # The daily counter holds exactly what was used: 400 + 0 + 790.
    day = datetime.now(UTC).strftime("%Y%m%d")
    assert int(sync_redis.get(f"{RUN_PREFIX}{{{tenant.name}}}:day:{day}")) == 1190


async def test_complete_is_idempotent_and_charges_an_underestimate(limiters):
    limiter = limiters()
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=1000, daily_token_quota=10**9)
    adm = await limiter.admit(tenant, 100)
    await adm.complete(500)  # the estimate was low: the extra 400 are charged
    await adm.complete(0)  # ignored
    await adm.release()  # ignored
    assert adm.done
    await (await limiter.admit(tenant, 450)).complete(450)
    assert (await refused(limiter, tenant, 100)).reason == REASON_TOKENS
    with pytest.raises(InvalidArgument):
        await (await limiter.admit(tenant, 0)).complete(-1)


async def test_a_refusal_takes_nothing(limiters):
    limiter = limiters()
    tenant = make_tenant(requests_per_s=0.01, burst=4, tokens_per_min=1000, daily_token_quota=10**9)
    await limiter.admit(tenant, 1000)  # empties tokens/min; one request of four used
    for _ in range(5):
        assert (await refused(limiter, tenant, 10)).reason == REASON_TOKENS
    # Five refusals took no requests from the bucket: three zero-token requests still pass.
    for _ in range(3):
        await limiter.admit(tenant, 0)
    assert (await refused(limiter, tenant)).reason == REASON_RATE


async def test_concurrency_slots_and_lease_expiry(limiters):
    limiter = limiters(lease_s=0.3, concurrency_retry_after_s=0.5)
    crashed = limiters(lease_s=0.3)
    tenant = make_tenant(requests_per_s=1000, max_concurrent=2, tokens_per_min=10**6)
    a = await limiter.admit(tenant, 10)
    await crashed.admit(tenant, 10)
    await crashed.close()  # its replica "crashed" with the request: nothing renews the lease any more
    err = await refused(limiter, tenant)
    assert err.reason == REASON_CONCURRENCY and err.retry_after == 0.5
    await a.complete(10)
    c = await limiter.admit(tenant, 10)
    await refused(limiter, tenant)
    await asyncio.sleep(0.35)  # the crashed replica's lease lapses; c's is renewed while it runs
    d = await limiter.admit(tenant, 10)
    await refused(limiter, tenant)
    for adm in (c, d):
        await adm.complete(10)


async def test_async_with_releases_on_error(limiters):
    limiter = limiters()
    tenant = make_tenant(requests_per_s=1000, max_concurrent=1, tokens_per_min=10**6)
    with pytest.raises(RuntimeError):
        async with await limiter.admit(tenant, 10):
            raise RuntimeError("upstream failed")
    async with await limiter.admit(tenant, 10) as adm:
        await adm.complete(10)


async def test_daily_quota_with_refund_and_utc_day_rollover(limiters):
    clock = {"now": datetime(2031, 3, 4, 23, 0, tzinfo=UTC)}
    limiter = limiters(utcnow=lambda: clock["now"])
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=10**6, daily_token_quota=1000)
    adm = await limiter.admit(tenant, 800)
    err = await refused(limiter, tenant, 300)
    assert err.reason == REASON_DAILY
    assert err.retry_after == pytest.approx(3600)  # until UTC midnight
    await adm.complete(200)  # 600 come back to today's quota
    await limiter.admit(tenant, 800)
    await refused(limiter, tenant, 1)
    clock["now"] += timedelta(hours=1, seconds=1)  # a new UTC day: a new counter
    late = await limiter.admit(tenant, 1000)
    await late.complete(0)


async def test_requests_larger_than_a_budget_are_invalid(limiters):
    limiter = limiters()
    tenant = make_tenant(tokens_per_min=1000, daily_token_quota=5000)
    with pytest.raises(InvalidArgument) as err:
        await limiter.admit(tenant, 1001)
    assert err.value.reason == "tokens_per_min_exceeded"
    tenant = make_tenant(tokens_per_min=10_000, daily_token_quota=5000)
    with pytest.raises(InvalidArgument) as err:
        await limiter.admit(tenant, 5001)
    assert err.value.reason == "daily_token_quota_exceeded"
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidArgument):
            await limiter.admit(tenant, bad)


async def test_two_replicas_share_the_counters_exactly(limiters):
    a, b = limiters(), limiters()
    assert a.client.connection_pool is not b.client.connection_pool
    tenant = make_tenant(requests_per_s=1000, burst=1000, max_concurrent=7, tokens_per_min=10**6)

    async def try_admit(limiter):
        try:
            return await limiter.admit(tenant, 100)
        except ResourceExhausted as exc:
            return exc

    results = await asyncio.gather(*(try_admit(a if i % 2 else b) for i in range(40)))
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == 7  # exactly the limit, though both replicas admitted at once
    assert {r.reason for r in results if isinstance(r, Exception)} == {REASON_CONCURRENCY}
    for r in admitted:
        await r.release()
    # A slot taken through one replica counts on the other; freed through one, usable through the other.
    held = [await a.admit(tenant, 100) for _ in range(7)]
    assert (await refused(b, tenant, 100)).reason == REASON_CONCURRENCY
    await held[0].complete(100)
    await b.admit(tenant, 100)
    await refused(a, tenant, 100)

    # Tokens: 20 requests of 100 against a budget of 1000, split over both replicas.
    tenant = make_tenant(requests_per_s=1000, burst=1000, max_concurrent=1000, tokens_per_min=1000)
    results = await asyncio.gather(*(try_admit(a if i % 2 else b) for i in range(20)))
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == 10
    await admitted[0].complete(0)  # refunded through replica A's admission ...
    await b.admit(tenant, 100)  # ... and spent through replica B
    assert (await refused(a, tenant, 100)).reason == REASON_TOKENS


async def test_keys_live_under_the_prefix_and_expire(limiters, sync_redis):
    limiter = limiters(lease_s=30)
    tenant = make_tenant(requests_per_s=10, tokens_per_min=6000, max_concurrent=5)
    adm = await limiter.admit(tenant, 600)
    keys = sorted(k.decode() for k in sync_redis.scan_iter(match=f"{RUN_PREFIX}{{{tenant.name}}}*"))
    assert [k.rsplit(":", 1)[-1] if ":day:" not in k else "day" for k in keys] == [
        "conc",
        "day",
        "rps",
        "tpm",
    ]
    for key in keys:
        assert 0 < sync_redis.pttl(key) <= 2 * 86400 * 1000  # nothing lives forever
    await adm.complete(600)
    assert sync_redis.zcard(f"{RUN_PREFIX}{{{tenant.name}}}:conc") == 0


def test_bad_settings_are_refused():
    from gateway.tenancy import LocalLimiter, RedisLimiter

    with pytest.raises(InvalidArgument):
        RedisLimiter.from_url(REDIS_URL, prefix="has space")
    with pytest.raises(InvalidArgument):
        LocalLimiter(scale=0)
    with pytest.raises(InvalidArgument):
        LocalLimiter(lease_s=0)


async def test_single_tenant_defaults_admit_a_64_client_load(limiters):
    from gateway.tenancy import default_tenant

    limiter = limiters()
    tenant = default_tenant().model_copy(update={"name": f"default-{RUN_PREFIX.split(':')[2]}"})
    for _ in range(3):  # three waves of 64 concurrent requests of 4k tokens each
        admitted = await asyncio.gather(*(limiter.admit(tenant, 4096) for _ in range(64)))
        await asyncio.gather(*(a.complete(1000) for a in admitted))
