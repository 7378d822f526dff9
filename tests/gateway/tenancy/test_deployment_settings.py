"""The mesh-level ``redis`` settings reach the gateway's Redis clients: the limiter's keys live under
``key_prefix``, and every pool holds ``max_connections``."""

from __future__ import annotations

import uuid

from prometheus_client import CollectorRegistry

from gateway.config import GatewaySettings
from gateway.deployment import build_tenancy, build_usage
from services.common.config import RedisConfig
from tests.gateway.tenancy.helpers import REDIS_URL, make_tenant


async def test_limiter_keys_and_pool_follow_the_redis_settings(sync_redis):
    prefix = f"limtest-{uuid.uuid4().hex[:8]}"
    redis = RedisConfig(url=REDIS_URL, key_prefix=prefix, max_connections=7)
    _, limiter = build_tenancy(GatewaySettings(), redis, REDIS_URL, registry=CollectorRegistry())
    try:
        assert limiter.redis.client.connection_pool.max_connections == 7
        admission = await limiter.admit(make_tenant(requests_per_s=10, tokens_per_min=1000), 5)
        assert admission.backend == "redis"
        await admission.complete(5)
        assert {k.decode().split("{")[0] for k in sync_redis.scan_iter(match=f"{prefix}:*")} == {
            f"{prefix}:lim:"
        }
    finally:
        await limiter.close()
        for k in sync_redis.scan_iter(match=f"{prefix}:*"):
            sync_redis.delete(k)


def test_usage_recorder_pool_follows_the_redis_settings():
    redis = RedisConfig(url=REDIS_URL, max_connections=3)
    recorder = build_usage(GatewaySettings(), redis, REDIS_URL, registry=None)
    assert recorder is not None
    assert recorder.redis.connection_pool.max_connections == 3
    recorder.close(timeout=1.0)
