"""Admission control: each tenant's requests/s, tokens/min, concurrency and daily quota.

``admit(tenant, estimated_tokens)`` checks every limit and, only if all pass, takes from all of them at
once; a refusal takes nothing and raises ``ResourceExhausted`` with a ``reason`` (``rate_limited``,
``tokens_per_min``, ``concurrency``, ``daily_quota``) and a ``retry_after`` in seconds. The estimate is
prompt + max_tokens: the worst case is reserved up front so concurrent requests cannot jointly overrun
a budget, and ``Admission.complete(actual_tokens)`` gives back what was not used.

The accounting, the same in every implementation:

- requests/s: a token bucket of ``bucket_size`` requests refilled at ``requests_per_s``;
- tokens/min: a token bucket of ``tokens_per_min`` tokens refilled at ``tokens_per_min / 60`` per second.
  A bucket is a sliding window without its bookkeeping: a reservation is taken, a refund is put back
  (capped at the capacity), and ``retry_after`` is exactly when enough has refilled;
- concurrency: a set of leases, each with an expiry (``lease_s``), so a replica that dies holding slots
  cannot leak them for longer than one lease;
- daily quota: a counter per UTC day, kept for two days so late refunds still land on the right day.

``RedisLimiter`` keeps the counters in Redis (one Lua script per operation; time from Redis ``TIME`` so
replicas with skewed clocks agree), so every gateway replica enforces the same numbers.
``LocalLimiter`` keeps them in process memory. ``FallbackLimiter`` uses Redis and falls back to the local
one while Redis is unreachable, or refuses with ``Unavailable`` when configured to fail closed.

A request larger than a whole budget (``estimated_tokens`` above ``tokens_per_min`` or the daily quota)
is ``InvalidArgument``: waiting cannot make it fit, the caller must lower ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.tenancy.config import Tenant, TenantLimits
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.embedding_cache.circuit_breaker import CircuitBreaker

log = logging.getLogger(__name__)

REASON_RATE = "rate_limited"
REASON_TOKENS = "tokens_per_min"
REASON_CONCURRENCY = "concurrency"
REASON_DAILY = "daily_quota"
_REASONS = {1: REASON_RATE, 2: REASON_CONCURRENCY, 3: REASON_TOKENS, 4: REASON_DAILY}
_MESSAGES = {
    REASON_RATE: "request rate limit reached",
    REASON_CONCURRENCY: "too many requests in flight",
    REASON_TOKENS: "tokens-per-minute limit reached",
    REASON_DAILY: "daily token quota used up",
}
DAY_KEY_TTL_S = 2 * 86400
# Exceptions that mean "Redis is not answering", as opposed to a bug in a script or a bad argument.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

UtcNow = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def utc_day(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d")


def seconds_to_utc_midnight(now: datetime) -> float:
    now = now.astimezone(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - now).total_seconds())


def _refused(tenant: str, reason: str, retry_after: float) -> ResourceExhausted:
    retry_after = max(0.001, round(retry_after, 3))
    return ResourceExhausted(
        f"tenant {tenant!r}: {_MESSAGES[reason]}; retry after {retry_after:g} s",
        reason=reason,
        retry_after=retry_after,
    )


def check_estimate(tenant: Tenant, estimated_tokens: int) -> None:
    """InvalidArgument for an estimate that no amount of waiting could admit."""
    if isinstance(estimated_tokens, bool) or not isinstance(estimated_tokens, int) or estimated_tokens < 0:
        raise InvalidArgument(f"estimated_tokens must be a non-negative integer, got {estimated_tokens!r}")
    lim = tenant.limits
    for cap, field_name in (
        (lim.tokens_per_min, "tokens_per_min"),
        (lim.daily_token_quota, "daily_token_quota"),
    ):
        if estimated_tokens > cap:
            raise InvalidArgument(
                f"request needs up to {estimated_tokens} tokens (prompt + max_tokens), more than tenant "
                f"{tenant.name!r}'s {field_name} of {cap}; lower max_tokens",
                reason=f"{field_name}_exceeded",
            )


Settle = Callable[["Admission", int], Awaitable[None]]


class Admission:
    """One admitted request's hold on its tenant's limits: a concurrency slot and a token reservation.

    Call ``complete(actual_tokens)`` when the request ends, or ``release()`` if it failed before using
    anything; both are idempotent (only the first call counts) and never raise for a backend outage
    (the lease then expires by itself). ``async with admission:`` releases on exit unless completed.
    """

    def __init__(self, *, tenant: str, reserved_tokens: int, lease_id: str, backend: str, settle: Settle):
        self.tenant = tenant
        self.reserved_tokens = reserved_tokens
        self.lease_id = lease_id
        self.backend = backend  # "redis" or "local": where the counters of this admission live
        self._settle = settle
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    async def complete(self, actual_tokens: int) -> None:
        """Free the slot and settle the reservation against what was used.

        Fewer tokens than reserved: the rest goes back to tokens/min and the daily quota. More (an
        estimate that was too low): the excess is charged, since the work was done.
        """
        if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
            raise InvalidArgument(f"actual_tokens must be a non-negative integer, got {actual_tokens!r}")
        if self._done:
            return
        self._done = True
        await self._settle(self, self.reserved_tokens - actual_tokens)

    async def release(self) -> None:
        """Free the slot and refund the whole reservation (the request failed or was cancelled early)."""
        await self.complete(0)

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class Limiter(Protocol):
    async def admit(self, tenant: Tenant, estimated_tokens: int) -> Admission: ...

    async def close(self) -> None: ...


# -- Redis ------------------------------------------------------------------------------------------
# A bucket is a hash {v: level, t: ms of last update}; a missing key is a full bucket.
_LUA_BUCKET = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local function level(key, rate, cap)
  local s = redis.call('HMGET', key, 'v', 't')
  local v, t = tonumber(s[1]), tonumber(s[2])
  if v == nil or t == nil then return cap end
  return math.min(cap, v + math.max(0, now - t) * rate)
end
local function store(key, v, rate, cap)
  redis.call('HSET', key, 'v', tostring(v), 't', now)
  -- Once full again the key carries no information: let it go.
  redis.call('PEXPIRE', key, math.ceil((cap - v) / rate) + 1000)
end
"""

# KEYS: rps bucket, tpm bucket, leases zset, day counter.
# ARGV: rps rate/ms, rps cap, tpm rate/ms, tpm cap, tokens, max concurrent, lease id, lease ms, quota,
#       day key ttl s. Returns {1} or {0, reason code, retry after ms (0: caller decides)}.
_LUA_ADMIT = (
    _LUA_BUCKET
    + """
local rps_rate, rps_cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm_rate, tpm_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, max_conc = tonumber(ARGV[5]), tonumber(ARGV[6])
local lease_ms, quota = tonumber(ARGV[8]), tonumber(ARGV[9])
local rps = level(KEYS[1], rps_rate, rps_cap)
if rps < 1 then return {0, 1, math.ceil((1 - rps) / rps_rate)} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= max_conc then return {0, 2, 0} end
local tpm = level(KEYS[2], tpm_rate, tpm_cap)
if tpm < tokens then return {0, 3, math.ceil((tokens - tpm) / tpm_rate)} end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used + tokens > quota then return {0, 4, 0} end
store(KEYS[1], rps - 1, rps_rate, rps_cap)
if tokens > 0 then
  store(KEYS[2], tpm - tokens, tpm_rate, tpm_cap)
  redis.call('INCRBY', KEYS[4], tokens)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[10]))
end
redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[7])
redis.call('PEXPIRE', KEYS[3], lease_ms)
return {1}
"""
)

# KEYS: tpm bucket, leases zset, day counter. ARGV: tpm rate/ms, tpm cap, tokens back (negative: charge),
# lease id. The day counter is only touched while it exists: after it expired there is nothing to refund.
_LUA_SETTLE = (
    _LUA_BUCKET
    + """
redis.call('ZREM', KEYS[2], ARGV[4])
local rate, cap, back = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if back ~= 0 then
  store(KEYS[1], math.min(cap, level(KEYS[1], rate, cap) + back), rate, cap)
  if redis.call('EXISTS', KEYS[3]) == 1 then
    local left = redis.call('DECRBY', KEYS[3], back)
    if left < 0 then redis.call('SET', KEYS[3], 0, 'KEEPTTL') end
  end
end
return 1
"""
)


class RedisLimiter:
    """Limits shared by every gateway replica through Redis.

    Keys: ``<prefix>{<tenant>}:rps|tpm|conc|day:<YYYYMMDD>``; the braces keep a tenant's keys in one
    Redis Cluster slot, which a multi-key script needs. Redis errors propagate (``FallbackLimiter``
    turns outages into local limiting); settling an admission swallows them, because the lease expires
    by itself and a lost refund only errs on the strict side.
    """

    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "ivm:lim:",
        lease_s: float = 300.0,
        concurrency_retry_after_s: float = 1.0,
        utcnow: UtcNow = _utcnow,
        owns_client: bool = False,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
            raise InvalidArgument(f"limiter key prefix {prefix!r} must be 1-64 of [A-Za-z0-9_.:-]")
        _check_lease(lease_s, concurrency_retry_after_s)
        self.client = client
        self.prefix = prefix
        self.lease_s = lease_s
        self.concurrency_retry_after_s = concurrency_retry_after_s
        self._utcnow = utcnow
        self._owns_client = owns_client
        self._admit = client.register_script(_LUA_ADMIT)
        self._settle_script = client.register_script(_LUA_SETTLE)

    @classmethod
    def from_url(
        cls, url: str, *, op_timeout_s: float = 0.2, max_connections: int = 64, **kwargs
    ) -> RedisLimiter:
        """A limiter with its own connection pool: bounded timeouts, no hidden retries."""
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(aioredis.Redis(connection_pool=pool), owns_client=True, **kwargs)

    def keys(self, tenant: str, day: str) -> dict[str, str]:
        base = f"{self.prefix}{{{tenant}}}"
        return {
            "rps": f"{base}:rps",
            "tpm": f"{base}:tpm",
            "conc": f"{base}:conc",
            "day": f"{base}:day:{day}",
        }

    async def admit(self, tenant: Tenant, estimated_tokens: int) -> Admission:
        check_estimate(tenant, estimated_tokens)
        lim = tenant.limits
        now = self._utcnow()
        keys = self.keys(tenant.name, utc_day(now))
        lease_id = uuid.uuid4().hex
        result = await self._admit(
            keys=[keys["rps"], keys["tpm"], keys["conc"], keys["day"]],
            args=[
                repr(lim.requests_per_s / 1000.0),
                lim.bucket_size,
                repr(lim.tokens_per_min / 60_000.0),
                lim.tokens_per_min,
                estimated_tokens,
                lim.max_concurrent,
                lease_id,
                max(1, int(self.lease_s * 1000)),
                lim.daily_token_quota,
                DAY_KEY_TTL_S,
            ],
        )
        if int(result[0]) != 1:
            reason = _REASONS[int(result[1])]
            retry_ms = int(result[2])
            if reason == REASON_CONCURRENCY:
                retry = self.concurrency_retry_after_s
            elif reason == REASON_DAILY:
                retry = seconds_to_utc_midnight(now)
            else:
                retry = retry_ms / 1000.0
            raise _refused(tenant.name, reason, retry)

        async def settle(adm: Admission, back: int) -> None:
            try:
                await self._settle_script(
                    keys=[keys["tpm"], keys["conc"], keys["day"]],
                    args=[repr(lim.tokens_per_min / 60_000.0), lim.tokens_per_min, back, lease_id],
                )
            except REDIS_DOWN as exc:
                log.warning(
                    "could not settle admission of tenant %s in redis (%s: %s); its slot expires by lease",
                    adm.tenant,
                    type(exc).__name__,
                    exc,
                )

        return Admission(
            tenant=tenant.name,
            reserved_tokens=estimated_tokens,
            lease_id=lease_id,
            backend=self.backend,
            settle=settle,
        )

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


# -- process memory ---------------------------------------------------------------------------------
@dataclass
class _Bucket:
    level: float
    at: float

    def current(self, now: float, rate: float, cap: float) -> float:
        return min(cap, self.level + max(0.0, now - self.at) * rate)

    def put(self, level: float, now: float) -> None:
        self.level, self.at = level, now


@dataclass
class _TenantState:
    rps: _Bucket
    tpm: _Bucket
    leases: dict[str, float] = field(default_factory=dict)
    day: str = ""
    day_used: int = 0


@dataclass(frozen=True)
class _Scaled:
    rate: float
    bucket: float
    tpm: float
    concurrent: int
    quota: int

    @classmethod
    def of(cls, lim: TenantLimits, scale: float) -> _Scaled:
        return cls(
            rate=lim.requests_per_s * scale,
            bucket=max(1.0, math.floor(lim.bucket_size * scale)),
            tpm=max(1.0, math.floor(lim.tokens_per_min * scale)),
            concurrent=max(1, math.floor(lim.max_concurrent * scale)),
            quota=max(1, math.floor(lim.daily_token_quota * scale)),
        )


class LocalLimiter:
    """The same limits in this process's memory: one replica's view only.

    ``scale`` is the fraction of each limit this replica grants on its own (e.g. 1 / replicas, so the
    fleet as a whole stays near the configured numbers while Redis is away). A request larger than a
    scaled budget still passes when that budget is untouched, so scaling never makes a request that
    fits the tenant's real limits impossible. Not thread-safe: use it from one event loop.
    """

    backend = "local"

    def __init__(
        self,
        *,
        scale: float = 1.0,
        lease_s: float = 300.0,
        concurrency_retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        utcnow: UtcNow = _utcnow,
    ):
        if not 0 < scale <= 1:
            raise InvalidArgument(f"local limiter scale must be in (0, 1], got {scale}")
        _check_lease(lease_s, concurrency_retry_after_s)
        self.scale = scale
        self.lease_s = lease_s
        self.concurrency_retry_after_s = concurrency_retry_after_s
        self._clock = clock
        self._utcnow = utcnow
        self._state: dict[str, _TenantState] = {}

    async def admit(self, tenant: Tenant, estimated_tokens: int) -> Admission:
        check_estimate(tenant, estimated_tokens)
        lim = _Scaled.of(tenant.limits, self.scale)
        now, wall = self._clock(), self._utcnow()
        st = self._state.get(tenant.name)
        if st is None:
            st = self._state[tenant.name] = _TenantState(_Bucket(lim.bucket, now), _Bucket(lim.tpm, now))
        day = utc_day(wall)
        if st.day != day:
            st.day, st.day_used = day, 0

        rps = st.rps.current(now, lim.rate, lim.bucket)
        if rps < 1:
            raise _refused(tenant.name, REASON_RATE, (1 - rps) / lim.rate)
        st.leases = {k: exp for k, exp in st.leases.items() if exp > now}
        if len(st.leases) >= lim.concurrent:
            raise _refused(tenant.name, REASON_CONCURRENCY, self.concurrency_retry_after_s)
        tpm_rate = lim.tpm / 60.0
        tpm = st.tpm.current(now, tpm_rate, lim.tpm)
        if tpm < estimated_tokens and tpm < lim.tpm:
            raise _refused(tenant.name, REASON_TOKENS, (min(estimated_tokens, lim.tpm) - tpm) / tpm_rate)
        if st.day_used + estimated_tokens > lim.quota and st.day_used > 0:
            raise _refused(tenant.name, REASON_DAILY, seconds_to_utc_midnight(wall))

        st.rps.put(rps - 1, now)
        st.tpm.put(tpm - estimated_tokens, now)
        st.day_used += estimated_tokens
        lease_id = uuid.uuid4().hex
        st.leases[lease_id] = now + self.lease_s

        async def settle(adm: Admission, back: int) -> None:
            st.leases.pop(adm.lease_id, None)
            if back:
                t = self._clock()
                st.tpm.put(min(lim.tpm, st.tpm.current(t, tpm_rate, lim.tpm) + back), t)
                if st.day == day:
                    st.day_used = max(0, st.day_used - back)

        return Admission(
            tenant=tenant.name,
            reserved_tokens=estimated_tokens,
            lease_id=lease_id,
            backend=self.backend,
            settle=settle,
        )

    async def close(self) -> None:
        self._state.clear()


def _check_lease(lease_s: float, concurrency_retry_after_s: float) -> None:
    if not 0.05 <= lease_s <= 86400:
        raise InvalidArgument(f"lease_s must be in [0.05, 86400], got {lease_s}")
    if not 0 < concurrency_retry_after_s <= 3600:
        raise InvalidArgument(
            f"concurrency_retry_after_s must be in (0, 3600], got {concurrency_retry_after_s}"
        )


# -- Redis with a local fallback --------------------------------------------------------------------
class FallbackLimiter:
    """Redis limits while Redis answers; a replica-local limiter (or a refusal) while it does not.

    Every Redis call is bounded by ``op_timeout_s``. On a connection error or timeout the limiter turns
    degraded: it logs once, counts ``internvl_mesh_tenancy_limiter_degradations_total``, sets the
    ``internvl_mesh_tenancy_limiter_degraded`` gauge, calls ``on_degraded(reason)`` and from then on admits
    through ``local`` (or raises ``Unavailable`` with ``fail_closed``), trying Redis again with one request
    (never two at once) ``reprobe_interval_s`` after the last failure: the embedding cache's
    ``CircuitBreaker`` with a threshold of one. The first answer from Redis ends the degraded state; the
    counters in Redis then apply again. Admissions settle where they were taken.

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
            self._recovered()  # Redis answered: it is up, the tenant is over a limit
            raise
        except REDIS_DOWN as exc:
            self._degrade(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return await self._without_redis(tenant, estimated_tokens)
        except RedisError:
            raise  # a script or protocol error is a bug, not an outage
        finally:
            if probe:
                self.breaker.end_probe()
        self._recovered()
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
        log.warning("rate limiter lost Redis (%s): %s until it answers again", reason, mode)
        if self._on_degraded is not None:
            self._on_degraded(reason)

    def _recovered(self) -> None:
        if not self.breaker.record_success():
            return
        self.degraded_gauge.set(0)
        log.warning("rate limiter reached Redis again: shared limits apply")

    async def close(self) -> None:
        await self.redis.close()
        await self.local.close()
