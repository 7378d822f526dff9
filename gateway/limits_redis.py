"""The Redis of the limit counters and usage records must not evict them: checked at gateway start.

Eviction is per Redis instance (``maxmemory-policy``). Under ``allkeys-lru`` (what a cache wants) a
tenant's concurrency leases, its token buckets or the day's quota counter vanish as soon as cache writes
fill the memory, and the tenant starts again from zero. So the gateway reads the policy of its limits
Redis (``redis.limits_url``, or the cache's ``redis.url`` when that is empty) with ``CONFIG GET``:

- ``noeviction``: fine. A full Redis then refuses writes (``OOM``), which the limiter treats as an outage
  (the per-replica fallback) and the usage recorder buffers, instead of silently losing counters.
- anything else, on a Redis of its own: a warning naming the risk (the counters are small, but nothing
  guarantees they survive memory pressure).
- anything else, on the embedding cache's own instance: the gateway refuses to start (``ConfigError``),
  since cache writes will evict the counters. Sharing the cache's instance needs ``noeviction`` and
  embeddings that expire (``cache.ttl_s``, bounded by the config to at most 30 days), so the cache
  frees its memory by itself and never crowds the counters out for good.
- a Redis that forbids ``CONFIG`` (managed services often do) or does not answer: logged as not checked.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.common.config import ConfigError, RedisConfig

log = logging.getLogger(__name__)

NOEVICTION = "noeviction"
MAX_CACHE_TTL_S = 30 * 24 * 3600


async def check_limits_redis(
    url: str, redis: RedisConfig, cache_ttl_s: float, *, timeout_s: float = 2.0
) -> str | None:
    """The ``maxmemory-policy`` of the limits Redis at ``url`` (password filled in), after acting on it as
    the module docstring says; None when there is no Redis or the policy could not be read."""
    if not url:
        return None
    shared = redis.limits_share_cache
    if shared and not 0 < cache_ttl_s <= MAX_CACHE_TTL_S:
        raise ConfigError(
            f"the limits share the embedding cache's Redis, so embeddings must expire: cache.ttl_s must be "
            f"in (0, {MAX_CACHE_TTL_S}], got {cache_ttl_s}"
        )
    policy = await _read_policy(url, timeout_s)
    if policy is None or policy == NOEVICTION:
        if policy and shared:
            log.info(
                "limits share the embedding cache's Redis (noeviction; embeddings expire after %g s): a "
                "full Redis refuses cache writes and limits fall back to per-replica shares; give limits "
                "their own Redis (redis.limits_url) in production",
                cache_ttl_s,
            )
        return policy
    risk = (
        f"the Redis of the rate limits and usage records has maxmemory-policy {policy}: under memory "
        "pressure it evicts tenants' concurrency leases, token buckets and daily quota counters, and "
        "the limits start again from zero"
    )
    if shared:
        raise ConfigError(
            f"{risk}. It is the embedding cache's Redis, whose writes will fill it: give limits a Redis "
            "of their own (redis.limits_url, maxmemory-policy noeviction), or set this one to noeviction"
        )
    log.warning("%s; set maxmemory-policy noeviction on it", risk)
    return policy


async def _read_policy(url: str, timeout_s: float) -> str | None:
    client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        reply = await client.config_get("maxmemory-policy")
    except ResponseError as exc:  # CONFIG renamed, disabled or not permitted to this user
        log.warning(
            "could not check the eviction policy of the limits Redis (CONFIG GET refused: %s); make sure "
            "its maxmemory-policy is noeviction, or limits and usage records may be evicted",
            str(exc).split("\n")[0][:200],
        )
        return None
    except (RedisError, OSError) as exc:
        log.warning(
            "could not check the eviction policy of the limits Redis (%s); make sure its "
            "maxmemory-policy is noeviction",
            type(exc).__name__,
        )
        return None
    finally:
        await client.aclose()
    value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
