"""A tenant tries to get past its limits through what goes wrong around them: cache pressure evicting
its counters, Redis going away while the gateway runs several replicas (limits x replicas, the day's
quota from zero), and a request that outlives its concurrency lease. Real redis-servers of the tests'
own (killed, configured with a small maxmemory) and the gateway's own wiring (``build_tenancy`` from the
args ``config render`` gives the gateway application)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.config import GatewayAppArgs, GatewaySettings
from gateway.deployment import build_tenancy
from gateway.limits_redis import check_limits_redis
from gateway.tenancy import REASON_CONCURRENCY, LocalLimiter, RedisLimiter
from mesh.topology import MeshConfig, render_serve_config
from services.common.config import CommonConfig, ConfigError, RedisConfig
from services.common.errors import ResourceExhausted
from services.common.serve_args import app_args, limits_redis_url
from services.common.tensors import WireTensor
from services.embedding_cache.config import shared_store_config
from services.embedding_cache.redis_store import RedisEmbeddingStore
from services.embedding_cache.store import StoredEmbedding
from tests.gateway.tenancy.helpers import make_tenant
from tests.support.own_redis import OwnRedis
from tests.support.ports import free_port

MAXMEMORY = 4 * 1024 * 1024


@pytest.fixture
def limits_redis():
    """A second redis-server of the test's own: the limits' instance, beside ``own_redis`` (the cache's)."""
    server = OwnRedis().start()
    yield server
    server.kill()


def _configure(server: OwnRedis, policy: str) -> None:
    import redis

    client = redis.Redis(port=server.port)
    client.config_set("maxmemory", str(MAXMEMORY))
    client.config_set("maxmemory-policy", policy)
    client.close()


def _keys(server: OwnRedis) -> list[str]:
    import redis

    client = redis.Redis(port=server.port)
    try:
        return sorted(k.decode() for k in client.scan_iter(count=1000))
    finally:
        client.close()


async def _fill_cache(common: CommonConfig, entries: int = 300) -> None:
    """Cache-like writes through the embedding cache's own store: 64 KiB embeddings, ~5x maxmemory."""
    store = RedisEmbeddingStore(shared_store_config(common, common.redis.url))
    tile = WireTensor.from_numpy(np.zeros((256, 64), dtype=np.float32), dtype="float32")
    try:
        for i in range(entries):
            await store.put(f"{common.redis.key_prefix}:emb:v1:ns:{i:064x}", StoredEmbedding([tile]))
    finally:
        await store.close()


async def _refused(limiter, tenant, tokens: int = 0) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        await limiter.admit(tenant, tokens)
    return err.value


async def test_cache_pressure_evicts_limits_that_share_the_cache_redis_not_their_own(own_redis, limits_redis):
    _configure(own_redis, "allkeys-lru")  # the embedding cache's Redis, as the chart runs it
    _configure(limits_redis, "noeviction")
    tenant = make_tenant(requests_per_s=1000, max_concurrent=1, tokens_per_min=10**6)

    # The risk: limits in the cache's allkeys-lru instance. The gateway refuses to start on it...
    shared = CommonConfig(redis=RedisConfig(url=own_redis.url))
    with pytest.raises(ConfigError, match="evicts"):
        await check_limits_redis(limits_redis_url(shared), shared.redis, shared.cache.ttl_s)
    # ...because cache writes evict the tenant's concurrency lease, and a second request gets in.
    _, limiter = build_tenancy(GatewaySettings(), shared.redis, limits_redis_url(shared), CollectorRegistry())
    try:
        held = await limiter.admit(tenant, 10)
        assert held.backend == "redis"
        await _fill_cache(shared)
        assert not [k for k in _keys(own_redis) if ":lim:" in k]  # evicted
        extra = await limiter.admit(tenant, 10)  # over max_concurrent=1
        assert extra.backend == "redis"
    finally:
        await limiter.close()

    # The fix: limits in an instance of their own with noeviction; the same cache pressure leaves them.
    own = CommonConfig(redis=RedisConfig(url=own_redis.url, limits_url=limits_redis.url))
    assert await check_limits_redis(limits_redis_url(own), own.redis, own.cache.ttl_s) == "noeviction"
    _, limiter = build_tenancy(GatewaySettings(), own.redis, limits_redis_url(own), CollectorRegistry())
    try:
        held = await limiter.admit(tenant, 10)
        await _fill_cache(own)
        assert (await _refused(limiter, tenant, 10)).reason == REASON_CONCURRENCY
        assert [k for k in _keys(limits_redis) if k.endswith(":conc")]
        await held.complete(10)
        await (await limiter.admit(tenant, 10)).complete(10)
    finally:
        await limiter.close()


def _gateway_args(redis_url: str, max_replicas: int) -> GatewayAppArgs:
    """The gateway application's args as ``config render`` writes them (what a replica receives)."""
    cfg = MeshConfig.model_validate(
        {
            "models": [{"name": "m", "path": "/models/m"}],
            "redis": {"url": redis_url},
            "gateway_deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": max_replicas}},
        }
    )
    (app,) = [a for a in render_serve_config(cfg)["applications"] if a["name"] == "gateway"]
    return app_args(GatewayAppArgs, app["args"], "gateway")


def _replicas(args: GatewayAppArgs, n: int = 2):
    url = limits_redis_url(args.common)
    return [
        build_tenancy(args.gateway, args.common.redis, url, CollectorRegistry(), replicas=args.max_replicas)[
            1
        ]
        for _ in range(n)
    ]


async def _admit_all(replicas, tenant, tokens: int, complete: bool, tries: int = 200) -> list[int]:
    """Admissions per replica, round robin, until every replica refuses (bounded by ``tries``)."""
    admitted = [0] * len(replicas)
    refusing: set[int] = set()
    for i in range(tries):
        r = i % len(replicas)
        try:
            adm = await replicas[r].admit(tenant, tokens)
        except ResourceExhausted:
            refusing.add(r)
            if len(refusing) == len(replicas):
                break
            continue
        admitted[r] += 1
        if complete:
            await adm.complete(tokens)
    return admitted


async def test_replicas_without_redis_together_admit_no_more_than_the_tenants_limits():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    args = _gateway_args(dead, max_replicas=2)
    replicas = _replicas(args)
    try:
        concurrent = make_tenant(requests_per_s=1000, max_concurrent=4, tokens_per_min=10**6)
        assert sum(await _admit_all(replicas, concurrent, 1, complete=False)) == 4
        rate = make_tenant(requests_per_s=0.001, burst=6, tokens_per_min=10**6)
        assert sum(await _admit_all(replicas, rate, 1, complete=True)) == 6
        tokens = make_tenant(requests_per_s=1000, tokens_per_min=1000)
        assert sum(await _admit_all(replicas, tokens, 100, complete=True)) * 100 <= 1000
        daily = make_tenant(requests_per_s=1000, tokens_per_min=10**6, daily_token_quota=1000)
        assert sum(await _admit_all(replicas, daily, 50, complete=True)) * 50 <= 1000
        assert all(r.degraded for r in replicas)
    finally:
        for r in replicas:
            await r.close()


async def test_the_days_quota_counts_on_from_redis_when_it_goes_away(own_redis):
    args = _gateway_args(own_redis.url, max_replicas=2)
    a, b = _replicas(args)
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=10**6, daily_token_quota=1000)
    try:
        for replica in (a, b):
            await (await replica.admit(tenant, 300)).complete(300)
        await (await a.admit(tenant, 0)).complete(0)  # both replicas' last report: 600 of 1000 used
        own_redis.kill()
        admitted = await _admit_all([a, b], tenant, 50, complete=True)
        assert a.degraded and b.degraded
        # 400 were left for the day: 200 per replica, not 1000 each from zero.
        assert [n * 50 for n in admitted] == [200, 200]
    finally:
        for replica in (a, b):
            await replica.close()


async def test_a_request_held_past_its_lease_keeps_its_slot(own_redis):
    tenant = make_tenant(requests_per_s=1000, max_concurrent=1, tokens_per_min=10**6)
    limiter = RedisLimiter.from_url(own_redis.url, op_timeout_s=2.0, lease_s=0.3)
    crashed = RedisLimiter.from_url(own_redis.url, op_timeout_s=2.0, lease_s=0.3)
    try:
        long_stream = await limiter.admit(tenant, 10)
        await asyncio.sleep(1.0)  # more than three leases
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY
        await long_stream.complete(10)
        # A replica that dies stops renewing: its slot is back within one lease.
        await crashed.admit(tenant, 10)
        await crashed.close()
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY
        await asyncio.sleep(0.4)
        await (await limiter.admit(tenant, 10)).complete(10)
    finally:
        await limiter.close()
        await crashed.close()


async def test_a_request_held_past_its_lease_keeps_its_slot_without_redis():
    tenant = make_tenant(requests_per_s=1000, max_concurrent=1, tokens_per_min=10**6)
    limiter = LocalLimiter(lease_s=0.3)
    try:
        long_stream = await limiter.admit(tenant, 10)
        await asyncio.sleep(1.0)
        assert (await _refused(limiter, tenant)).reason == REASON_CONCURRENCY
        await long_stream.complete(10)
        await (await limiter.admit(tenant, 10)).complete(10)
    finally:
        await limiter.close()
