"""``RedisLimiter``: every limit kept in Redis, shared by every gateway replica.

One Lua script per operation (admit, settle, renew a lease), with time from Redis ``TIME`` so replicas
with skewed clocks agree. The counters are small and must never be evicted: they belong in a Redis of
their own with ``maxmemory-policy noeviction`` (``redis.limits_url``; see ``gateway.limits_redis``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.tenancy.admission import (
    DAY_KEY_TTL_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_HOLD_S,
    REASON_CONCURRENCY,
    REASON_DAILY,
    REASONS,
    Admission,
    Held,
    LeaseKeeper,
    UtcNow,
    check_estimate,
    check_lease,
    is_redis_down,
    refused,
    seconds_to_utc_midnight,
    utc_day,
    utcnow,
)
from gateway.tenancy.config import Tenant
from services.common.errors import InvalidArgument

log = logging.getLogger("gateway.tenancy.limiter")

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
#       day key ttl s. Returns {1, tokens of the day} or {0, reason code, retry after ms (0: caller decides)}.
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
  used = redis.call('INCRBY', KEYS[4], tokens)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[10]))
end
redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[7])
if redis.call('PTTL', KEYS[3]) < lease_ms then redis.call('PEXPIRE', KEYS[3], lease_ms) end
return {1, used}
"""
)

# KEYS: tpm bucket, leases zset, day counter. ARGV: tpm rate/ms, tpm cap, tokens back (negative: charge),
# lease id. The day counter is only touched while it exists: after it expired there is nothing to refund.
# Returns the tokens of the day, or -1 when the counter is gone.
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
return tonumber(redis.call('GET', KEYS[3]) or '-1')
"""
)

# KEYS: leases zset. ARGV: lease id, lease ms. Extends a lease still held (XX: a lease that was pruned,
# or lost with a restarted Redis, is not brought back over another request's slot). Returns 1 if held.
_LUA_RENEW = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local lease_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('PTTL', KEYS[1]) < lease_ms then redis.call('PEXPIRE', KEYS[1], lease_ms) end
return 1
"""


class RedisLimiter:
    """Limits shared by every gateway replica through Redis.

    Keys: ``<prefix>{<tenant>}:rps|tpm|conc|day:<YYYYMMDD>``; the braces keep a tenant's keys in one
    Redis Cluster slot, which a multi-key script needs. Redis errors propagate (``FallbackLimiter``
    turns outages into local limiting); settling an admission and renewing leases swallow them, because
    a lease expires by itself and a lost refund only errs on the strict side. ``on_day_used(day, tenant,
    tokens)``, when set, hears the day's count Redis reports at each admission and settlement.
    """

    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "ivm:lim:",
        lease_s: float = DEFAULT_LEASE_S,
        concurrency_retry_after_s: float = 1.0,
        max_hold_s: float = DEFAULT_MAX_HOLD_S,
        utcnow: UtcNow = utcnow,
        owns_client: bool = False,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
            raise InvalidArgument(f"limiter key prefix {prefix!r} must be 1-64 of [A-Za-z0-9_.:-]")
        check_lease(lease_s, concurrency_retry_after_s, max_hold_s)
        self.client = client
        self.prefix = prefix
        self.lease_s = lease_s
        self.concurrency_retry_after_s = concurrency_retry_after_s
        self.utcnow = utcnow
        self._owns_client = owns_client
        self._admit = client.register_script(_LUA_ADMIT)
        self._settle_script = client.register_script(_LUA_SETTLE)
        self._renew_script = client.register_script(_LUA_RENEW)
        self.leases = LeaseKeeper(lease_s, max_hold_s, self._renew)
        self.on_day_used: Callable[[str, str, int], None] | None = None

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
        now = self.utcnow()
        day = utc_day(now)
        keys = self.keys(tenant.name, day)
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
            reason = REASONS[int(result[1])]
            if reason == REASON_CONCURRENCY:
                retry = self.concurrency_retry_after_s
            elif reason == REASON_DAILY:
                retry = seconds_to_utc_midnight(now)
            else:
                retry = int(result[2]) / 1000.0
            raise refused(tenant.name, reason, retry)

        async def settle(adm: Admission, back: int) -> None:
            self.leases.drop(lease_id)
            try:
                used = await self._settle_script(
                    keys=[keys["tpm"], keys["conc"], keys["day"]],
                    args=[repr(lim.tokens_per_min / 60_000.0), lim.tokens_per_min, back, lease_id],
                )
                self._report(day, tenant.name, int(used))
            except (RedisError, OSError) as exc:
                if not is_redis_down(exc):
                    raise
                log.warning(
                    "could not settle admission of tenant %s in redis (%s: %s); its slot expires by lease",
                    adm.tenant,
                    type(exc).__name__,
                    exc,
                )

        self.leases.hold(lease_id, keys["conc"])
        self._report(day, tenant.name, int(result[1]))
        return Admission(
            tenant=tenant.name,
            reserved_tokens=estimated_tokens,
            lease_id=lease_id,
            backend=self.backend,
            settle=settle,
        )

    def _report(self, day: str, tenant: str, used: int) -> None:
        if self.on_day_used is not None and used >= 0:
            self.on_day_used(day, tenant, used)

    async def _renew(self, held: list[Held]) -> None:
        lease_ms = max(1, int(self.lease_s * 1000))
        try:
            pipe = self.client.pipeline(transaction=False)
            for h in held:
                await self._renew_script(keys=[h.where], args=[h.lease_id, lease_ms], client=pipe)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            if not is_redis_down(exc):
                raise
            log.warning(
                "could not renew %d concurrency leases in redis (%s); they lapse within %g s",
                len(held),
                type(exc).__name__,
                self.lease_s,
            )

    async def add_day_usage(self, tenant: str, day: str, tokens: int) -> None:
        """Add ``tokens`` to ``tenant``'s counter of ``day`` (what was admitted while Redis was away)."""
        key = self.keys(tenant, day)["day"]
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(key, tokens)
        pipe.expire(key, DAY_KEY_TTL_S)
        await pipe.execute()

    async def close(self) -> None:
        self.leases.close()
        if self._owns_client:
            await self.client.aclose()
