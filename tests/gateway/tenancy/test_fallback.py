"""FallbackLimiter against a redis-server of its own: killed mid-test (local limits take over, with a
metric, a log line and a callback), restarted (Redis limits resume), paused (the per-operation timeout
bounds the wait), and the fail-closed mode."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from gateway.tenancy import REASON_CONCURRENCY, FallbackLimiter, LocalLimiter, RedisLimiter
from services.common.errors import ResourceExhausted, Unavailable
from tests.gateway.tenancy.helpers import make_tenant


def fallback(
    url: str, *, fail_closed: bool = False, reprobe_interval_s: float = 0.3, op_timeout_s: float = 1.0
):
    """A FallbackLimiter with a private registry. A killed server refuses connections at once, so the
    op timeout only matters for the paused server; it is generous elsewhere so that a slow first call
    after a restart on a loaded machine is not mistaken for an outage."""
    registry = CollectorRegistry()
    events: list[str] = []
    limiter = FallbackLimiter(
        RedisLimiter.from_url(url, op_timeout_s=op_timeout_s),
        LocalLimiter(),
        fail_closed=fail_closed,
        op_timeout_s=op_timeout_s,
        reprobe_interval_s=reprobe_interval_s,
        on_degraded=events.append,
        registry=registry,
    )
    return limiter, registry, events


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


async def test_redis_down_falls_back_to_local_then_resumes(own_redis, caplog):
    limiter, registry, events = fallback(own_redis.url)
    tenant = make_tenant(requests_per_s=1000, max_concurrent=2, tokens_per_min=10**6)
    try:
        on_redis = [await limiter.admit(tenant, 10) for _ in range(2)]
        assert {a.backend for a in on_redis} == {"redis"} and not limiter.degraded
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY

        own_redis.kill()
        with caplog.at_level(logging.WARNING, logger="gateway.tenancy.limiter"):
            adm = await limiter.admit(tenant, 10)
        assert adm.backend == "local" and limiter.degraded
        assert "lost Redis" in caplog.text and "per replica" in caplog.text
        assert len(events) == 1
        assert metric(registry, "internvl_mesh_tenancy_limiter_degradations_total") == 1
        assert metric(registry, "internvl_mesh_tenancy_limiter_degraded") == 1
        # The local limiter enforces the tenant's limits on its own counters.
        await limiter.admit(tenant, 10)
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY
        assert metric(registry, "internvl_mesh_tenancy_limiter_local_admissions_total") == 2
        # Settling Redis admissions while Redis is down does not raise (their leases lapse by themselves).
        await on_redis[0].complete(10)
        await adm.release()

        own_redis.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.35)  # one re-probe interval
        await admit_on_redis(limiter, tenant)
        assert not limiter.degraded
        assert metric(registry, "internvl_mesh_tenancy_limiter_degraded") == 0
        assert "reached Redis again" in caplog.text
        # Redis counters apply again: one more fits in Redis although the local limiter still holds one.
        await limiter.admit(tenant, 10)
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY
        # one outage, counted once
        assert metric(registry, "internvl_mesh_tenancy_limiter_degradations_total") == 1
    finally:
        await limiter.close()


async def test_a_hung_redis_costs_one_timeout_then_local(own_redis):
    limiter, registry, events = fallback(own_redis.url, reprobe_interval_s=5, op_timeout_s=0.2)
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=10**6)
    try:
        await (await limiter.admit(tenant, 1)).complete(1)
        own_redis.pause()
        start = time.perf_counter()
        first = await limiter.admit(tenant, 1)
        assert first.backend == "local" and time.perf_counter() - start < 0.5
        start = time.perf_counter()
        for _ in range(10):  # until the next probe, no waiting on Redis at all
            assert (await limiter.admit(tenant, 1)).backend == "local"
        assert time.perf_counter() - start < 0.1
        assert events and "Timeout" in events[0]
    finally:
        own_redis.resume()
        await limiter.close()


async def test_fail_closed_refuses_while_redis_is_down(own_redis):
    limiter, registry, events = fallback(own_redis.url, fail_closed=True, reprobe_interval_s=0.2)
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=10**6)
    try:
        assert (await limiter.admit(tenant, 1)).backend == "redis"
        own_redis.kill()
        for _ in range(2):
            with pytest.raises(Unavailable) as err:
                await limiter.admit(tenant, 1)
            assert err.value.http_status == 503 and err.value.reason == "limiter_unavailable"
        assert metric(registry, "internvl_mesh_tenancy_limiter_degradations_total") == 1
        assert metric(registry, "internvl_mesh_tenancy_limiter_local_admissions_total") == 0
        own_redis.start()
        await asyncio.sleep(0.25)
        await admit_on_redis(limiter, tenant)
        assert not limiter.degraded
    finally:
        await limiter.close()


async def _refused(limiter, tenant) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        await limiter.admit(tenant, 10)
    return err.value


async def admit_on_redis(limiter, tenant, timeout: float = 5.0):
    """Admit until Redis decides: the first probe after a restart may still time out on a loaded machine
    (a new connection and a script reload within one op timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            adm = await limiter.admit(tenant, 10)
            if adm.backend == "redis":
                return adm
            await adm.release()
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("Redis limits did not resume")
        await asyncio.sleep(0.05)
