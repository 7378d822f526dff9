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
- concurrency: a set of leases, each with an expiry (``lease_s``), renewed every ``lease_s / 3`` while
  the request runs (a 600 s stream keeps its slot), so a replica that dies holding slots cannot leak
  them for longer than one lease;
- daily quota: a counter per UTC day, kept for two days so late refunds still land on the right day.

``RedisLimiter`` keeps the counters in Redis (one Lua script per operation; time from Redis ``TIME`` so
replicas with skewed clocks agree), so every gateway replica enforces the same numbers; that Redis must
not evict them (``maxmemory-policy noeviction``, checked by ``gateway.limits_redis``).
``LocalLimiter`` keeps them in process memory. ``FallbackLimiter`` uses Redis and falls back to the
local one while Redis is unreachable (each replica then grants 1 / N of every limit, N the most gateway
replicas that can run), or refuses with ``Unavailable`` when configured to fail closed.

This module is where the limiters are imported from; each lives in its own module: ``admission``
(``Admission``, the reasons, the ``LeaseKeeper``), ``redis_limiter``, ``local_limiter``, ``fallback``.

A request larger than a whole budget (``estimated_tokens`` above ``tokens_per_min`` or the daily quota)
is ``InvalidArgument``: waiting cannot make it fit, the caller must lower ``max_tokens``.
"""

from gateway.tenancy.admission import (
    DAY_KEY_TTL_S,
    REASON_CONCURRENCY,
    REASON_DAILY,
    REASON_RATE,
    REASON_TOKENS,
    REDIS_DOWN,
    Admission,
    LeaseKeeper,
    Limiter,
    check_estimate,
    is_redis_down,
    seconds_to_utc_midnight,
    utc_day,
)
from gateway.tenancy.fallback import FallbackLimiter
from gateway.tenancy.local_limiter import LocalLimiter
from gateway.tenancy.redis_limiter import RedisLimiter

__all__ = [
    "DAY_KEY_TTL_S",
    "REASON_CONCURRENCY",
    "REASON_DAILY",
    "REASON_RATE",
    "REASON_TOKENS",
    "REDIS_DOWN",
    "Admission",
    "FallbackLimiter",
    "LeaseKeeper",
    "Limiter",
    "LocalLimiter",
    "RedisLimiter",
    "check_estimate",
    "is_redis_down",
    "seconds_to_utc_midnight",
    "utc_day",
]
