"""``FallbackLimiter``: Redis limits while Redis answers; the replica's share of them while it does not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from gateway.tenancy.admission import REDIS_DOWN, Admission, is_redis_down, utc_day
from gateway.tenancy.config import Tenant
from gateway.tenancy.local_limiter import LocalLimiter
from gateway.tenancy.redis_limiter import RedisLimiter
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.embedding_cache.circuit_breaker import CircuitBreaker

log = logging.getLogger("gateway.tenancy.limiter")


class FallbackLimiter:
    """Redis limits while Redis answers; a replica-local limiter (or a refusal) while it does not.

    Every Redis call is bounded by ``op_timeout_s``. On a connection error, a timeout or a Redis that
    refuses writes (full under ``noeviction``, read-only, loading) the limiter turns degraded: it logs
    once, counts ``internvl_mesh_tenancy_limiter_degradations_total``, sets the
    ``internvl_mesh_tenancy_limiter_degraded`` gauge, calls ``on_degraded(reason)`` and from then on admits
    through ``local`` (or raises ``Unavailable`` with ``fail_closed``), trying Redis again with one request
    (never two at once) ``reprobe_interval_s`` after the last failure: the embedding cache's
    ``CircuitBreaker`` with a threshold of one. The first answer from Redis ends the degraded state; the
    counters in Redis then apply again, and the tokens admitted locally are added to Redis's day counters.
    Admissions settle where they were taken.

    ``local`` stands in for Redis (``LocalLimiter.for_replicas``: 1 / N of every limit per replica, the
    daily quota counted on from what Redis last reported here, which this class tells it).

    ``registry`` defaults to prometheus_client's global one, which allows one instance per process;
    pass a private ``CollectorRegistry`` for more.
    """

    def __init__(
        self,
        redis_limiter: RedisLimiter,
        local_limiter: LocalLimiter,
        *,
        fail_closed: bool = False,
        op_timeout_s: float = 0.2,
        reprobe_interval_s: float = 2.0,
        on_degraded: Callable[[str], None] | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0.001 <= op_timeout_s <= 30:
            raise InvalidArgument(f"op_timeout_s must be in [0.001, 30], got {op_timeout_s}")
        if not 0.01 <= reprobe_interval_s <= 3600:
            raise InvalidArgument(f"reprobe_interval_s must be in [0.01, 3600], got {reprobe_interval_s}")
        self.redis = redis_limiter
        self.local = local_limiter
        self.local.stand_in = True
        self.redis.on_day_used = self.local.observe  # the stand-in counts on from Redis's last report
        self.fail_closed = fail_closed
        self.op_timeout_s = op_timeout_s
        self.reprobe_interval_s = reprobe_interval_s
        self._on_degraded = on_degraded
        # Threshold 1: the first outage degrades; one probe every reprobe_interval_s after the last failure.
        self.breaker = CircuitBreaker(1, reprobe_interval_s, clock)
        self.degradations = Counter(
            "internvl_mesh_tenancy_limiter_degradations_total",
            "Times the rate limiter lost Redis and fell back to per-replica limits (or fail-closed).",
            registry=registry,
        )
        self.local_admissions = Counter(
            "internvl_mesh_tenancy_limiter_local_admissions_total",
            "Admissions decided by the per-replica limiter because Redis was unreachable.",
            registry=registry,
        )
        self.degraded_gauge = Gauge(
            "internvl_mesh_tenancy_limiter_degraded",
            "1 while the rate limiter runs without Redis, else 0.",
            registry=registry,
        )

    @property
    def degraded(self) -> bool:
        return self.breaker.is_open

    async def admit(self, tenant: Tenant, estimated_tokens: int) -> Admission:
        if not self.breaker.allow():
            return await self._without_redis(tenant, estimated_tokens)
        probe = self.breaker.is_open  # let through while degraded: this call is the probe
        try:
            async with asyncio.timeout(self.op_timeout_s):
                admission = await self.redis.admit(tenant, estimated_tokens)
        except ResourceExhausted:
            await self._answered()  # Redis answered: it is up, the tenant is over a limit
            raise
        except (*REDIS_DOWN, RedisError) as exc:
            if not is_redis_down(exc):
                raise  # a script or protocol error is a bug, not an outage
            self._degrade(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return await self._without_redis(tenant, estimated_tokens)
        finally:
            if probe:
                self.breaker.end_probe()
        await self._answered()
        return admission

    async def _without_redis(self, tenant: Tenant, estimated_tokens: int) -> Admission:
        if self.fail_closed:
            raise Unavailable(
                f"rate limiter unavailable ({self.breaker.last_error}); refusing requests (fail-closed)",
                reason="limiter_unavailable",
            )
        admission = await self.local.admit(tenant, estimated_tokens)
        self.local_admissions.inc()
        return admission

    def _degrade(self, reason: str) -> None:
        if not self.breaker.record_failure(reason):
            return  # already degraded: the next probe is one interval away again
        self.degradations.inc()
        self.degraded_gauge.set(1)
        mode = "refusing requests (fail-closed)" if self.fail_closed else "enforcing limits per replica"
        log.warning(
            "rate limiter lost Redis (%s): %s until it answers again (each replica 1/%g of every limit)",
            reason,
            mode,
            round(1 / self.local.scale, 3),
        )
        if self._on_degraded is not None:
            self._on_degraded(reason)

    async def _answered(self) -> None:
        """Redis answered: the stand-in learns the day; after an outage, shared limits resume."""
        self.local.observe(utc_day(self.redis.utcnow()))
        if not self.breaker.record_success():
            return
        self.degraded_gauge.set(0)
        log.warning("rate limiter reached Redis again: shared limits apply")
        await self._sync_day_usage()

    async def _sync_day_usage(self) -> None:
        """Add the tokens admitted without Redis to its day counters, so the quota holds across outages
        (best effort: what cannot be added now is tried again after the next outage)."""
        for tenant, day, tokens in self.local.unsynced_day_usage():
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self.redis.add_day_usage(tenant, day, tokens)
            except (*REDIS_DOWN, RedisError) as exc:
                log.warning("could not add tokens admitted without Redis to its counters (%s)", exc)
                return
            self.local.synced(tenant, day, tokens)

    async def close(self) -> None:
        await self.redis.close()
        await self.local.close()
