"""The limits Redis: its own URL and password (or the cache's), the eviction-policy check at gateway
start, a full noeviction Redis taken as an outage, the day's tokens given back to Redis after one, the
replica count the fallback divides by, and every key the gateway writes under ``redis.key_prefix``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from gateway.config import GatewayAppArgs, GatewaySettings
from gateway.core import RequestRecord
from gateway.deployment import build_tenancy, build_usage
from gateway.limits_redis import check_limits_redis
from gateway.tenancy import REASON_CONCURRENCY, FallbackLimiter, LocalLimiter, RedisLimiter
from gateway.tenancy.admission import is_redis_down, utc_day, utcnow
from services.common.config import CommonConfig, ConfigError, RedisConfig
from services.common.errors import ResourceExhausted
from services.common.refs import embedding_key
from services.common.serve_args import limits_redis_url
from services.common.tensors import WireTensor
from services.common.types import TilingParams
from services.embedding_cache.config import shared_store_config
from services.embedding_cache.redis_store import RedisEmbeddingStore
from services.embedding_cache.store import StoredEmbedding
from tests.gateway.tenancy.helpers import make_tenant
from tests.support.own_redis import OwnRedis

LOGGER = "gateway.limits_redis"


def test_limits_url_and_password_default_to_the_caches():
    cache = CommonConfig(redis=RedisConfig(url="redis://cache:6379/0"))
    env = {"REDIS_PASSWORD": "c pw", "REDIS_LIMITS_PASSWORD": "l-pw"}
    assert limits_redis_url(cache, env) == "redis://:c%20pw@cache:6379/0"
    assert cache.redis.limits_share_cache
    own = CommonConfig(redis=RedisConfig(url="redis://cache:6379/0", limits_url="redis://limits:6379/0"))
    assert limits_redis_url(own, env) == "redis://:l-pw@limits:6379/0"
    assert not own.redis.limits_share_cache
    # Another db of the same server is the same instance: eviction is per instance.
    assert RedisConfig(url="redis://cache:6379/0", limits_url="redis://CACHE/3").limits_share_cache
    assert not RedisConfig(limits_url="redis://limits:6379/0").limits_share_cache
    with pytest.raises(ValueError, match="redis://"):
        RedisConfig(limits_url="http://limits:6379/0")


def test_the_fallback_divides_by_the_most_replicas_serve_may_run():
    def args(options):
        return GatewayAppArgs(
            models=[{"name": "m", "encoder_app": "e", "decoder_app": "d"}], deployment_options=options
        )

    assert args({"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}}).max_replicas == 8
    assert args({"num_replicas": 3}).max_replicas == 3
    assert args({"num_replicas": "auto"}).max_replicas == 100
    assert args({}).max_replicas == 1


def _redis_with(server: OwnRedis, policy: str) -> None:
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", policy)
    client.close()


async def test_an_evicting_limits_redis_is_reported_at_start(own_redis, caplog):
    _redis_with(own_redis, "allkeys-lru")
    cfg = RedisConfig(url="redis://127.0.0.1:6379/0", limits_url=own_redis.url)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await check_limits_redis(own_redis.url, cfg, 3600) == "allkeys-lru"
    assert "maxmemory-policy allkeys-lru" in caplog.text and "daily quota" in caplog.text
    assert "noeviction" in caplog.text
    # The cache's own instance evicting: refused, with what to do.
    shared = RedisConfig(url=own_redis.url)
    with pytest.raises(ConfigError, match="redis.limits_url"):
        await check_limits_redis(own_redis.url, shared, 3600)
    _redis_with(own_redis, "noeviction")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert await check_limits_redis(own_redis.url, shared, 3600) == "noeviction"
    assert "expire after 3600 s" in caplog.text and "WARNING" not in caplog.text


async def test_a_redis_that_forbids_config_is_logged_as_not_checked(own_redis, caplog):
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command("ACL", "SETUSER", "gw", "on", ">gw-pass", "~*", "+@all", "-config")
    admin.close()
    url = f"redis://gw:gw-pass@127.0.0.1:{own_redis.port}/0"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await check_limits_redis(url, RedisConfig(url=url), 3600) is None
    assert "could not check the eviction policy" in caplog.text and "no permissions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await check_limits_redis(f"redis://127.0.0.1:{own_redis.port + 1}/0", RedisConfig(), 1) is None
    assert "could not check" in caplog.text


async def test_a_full_noeviction_redis_never_turns_a_request_into_an_error(own_redis):
    """Full under noeviction, Redis refuses new data (OOM): that is an outage (the fallback), never a bug;
    the limits hold either way (Redis lets a script that began by pruning go on writing)."""
    client = redis.Redis(port=own_redis.port)
    client.set("ballast", b"x" * (2 << 20))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(1 << 20))  # below what is stored: new data is refused (OOM)
    with pytest.raises(redis.ResponseError) as oom:
        client.set("more", "data")
    client.close()
    assert is_redis_down(oom.value)
    limiter = FallbackLimiter(
        RedisLimiter.from_url(own_redis.url, op_timeout_s=2.0),
        LocalLimiter.for_replicas(1),
        op_timeout_s=2.0,
        registry=CollectorRegistry(),
    )
    tenant = make_tenant(requests_per_s=100, max_concurrent=1)
    try:
        admission = await limiter.admit(tenant, 10)
        with pytest.raises(ResourceExhausted) as err:
            await limiter.admit(tenant, 10)
        assert err.value.reason == REASON_CONCURRENCY
        await admission.complete(10)
    finally:
        await limiter.close()


async def test_tokens_admitted_without_redis_are_added_to_its_day_counter(own_redis):
    limiter = FallbackLimiter(
        RedisLimiter.from_url(own_redis.url, op_timeout_s=2.0, prefix="ivm:lim:"),
        LocalLimiter.for_replicas(1),
        op_timeout_s=2.0,
        reprobe_interval_s=0.2,
        registry=CollectorRegistry(),
    )
    tenant = make_tenant(requests_per_s=1000, tokens_per_min=10**6, daily_token_quota=10**6)
    try:
        await (await limiter.admit(tenant, 100)).complete(100)
        own_redis.kill()
        local = await limiter.admit(tenant, 500)
        assert local.backend == "local"
        await local.complete(300)  # 300 used: 200 go back
        own_redis.start()  # empty: its counter of the day is gone
        await asyncio.sleep(0.25)
        await (await limiter.admit(tenant, 0)).complete(0)
        assert not limiter.degraded
        client = redis.Redis(port=own_redis.port)
        day = client.get(f"ivm:lim:{{{tenant.name}}}:day:{utc_day(utcnow())}")
        client.close()
        assert int(day) == 300
    finally:
        await limiter.close()


async def test_every_key_the_mesh_writes_carries_the_prefix(own_redis):
    prefix = f"acme-{uuid.uuid4().hex[:6]}"
    common = CommonConfig(redis=RedisConfig(url=own_redis.url, key_prefix=prefix))
    url = limits_redis_url(common)
    _, limiter = build_tenancy(GatewaySettings(), common.redis, url, CollectorRegistry(), replicas=2)
    usage = build_usage(GatewaySettings(), common.redis, url, registry=None)
    store = RedisEmbeddingStore(shared_store_config(common, common.redis.url))
    try:
        tenant = make_tenant(requests_per_s=100, tokens_per_min=10**6)
        await (await limiter.admit(tenant, 50)).complete(20)
        await limiter.admit(tenant, 5)  # a lease left held
        usage.start()
        usage.on_complete(RequestRecord("req-1", tenant.name, "m", started=time.monotonic()))
        assert usage.flush(5) and usage.written == 1
        tile = WireTensor.from_numpy(np.zeros((256, 8), dtype=np.float32), dtype="float32")
        key = embedding_key("ns", "enc", TilingParams(), "0" * 64, prefix=common.redis.key_prefix)
        assert await store.put(key, StoredEmbedding([tile]))
        assert await store.acquire_fill_lock(key, 5.0)
        client = redis.Redis(port=own_redis.port)
        keys = sorted(k.decode() for k in client.scan_iter(count=1000))
        client.close()
        assert keys and all(k.startswith(f"{prefix}:") for k in keys), keys
        assert f"{prefix}:usage" in keys and any(":lim:" in k for k in keys)
    finally:
        await limiter.close()
        usage.close(timeout=1.0)
        await store.close()
