"""``LocalLimiter``: the limits in this process's memory, one replica's view only.

Alone (no Redis configured) it is the gateway's limiter. Behind ``FallbackLimiter`` it stands in for
Redis while Redis is unreachable, and then it must not multiply the limits by the number of replicas:
``scale`` is the fraction of every limit one replica grants on its own, ``1 / N`` with N the most
gateway replicas that can run at once, so the fleet together never admits more than the tenant's limits
(requests/s, tokens/min, concurrency; a budget smaller than N shares is at least 1 per replica).

The daily quota, standing in for Redis, counts on from what Redis last reported for the tenant's day
(``observe``): the replica may take ``1 / N`` of what the tenant had left. When Redis reported nothing of
today for the tenant (a replica started during the outage, or the tenant's first request of the day came
after Redis went away), the share is the conservative ``quota / N`` x the fraction of the UTC day still
to come: what an even pace leaves. An outage that began on an earlier day knows today's start: zero.
What the replica admitted without Redis is added to Redis's counter when Redis answers again.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from gateway.tenancy.admission import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_HOLD_S,
    REASON_CONCURRENCY,
    REASON_DAILY,
    REASON_RATE,
    REASON_TOKENS,
    Admission,
    Held,
    LeaseKeeper,
    UtcNow,
    check_estimate,
    check_lease,
    refused,
    seconds_to_utc_midnight,
    utc_day,
    utcnow,
)
from gateway.tenancy.config import Tenant, TenantLimits
from services.common.errors import InvalidArgument


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
    day_used: int = 0  # tokens counted here today (net of refunds) and not yet added to Redis's counter


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


@dataclass(frozen=True)
class _DayShare:
    tokens: int  # what this replica may count today
    strict: bool  # a share of a fleet budget: never exceeded, even by a first request
    left: int | None  # what the whole fleet had left of the day, when known


class LocalLimiter:
    """The same limits in this process's memory (see the module docstring).

    ``stand_in``: this limiter stands in for Redis (``FallbackLimiter`` sets it), so its daily quota is a
    share of what Redis last reported as left. Alone, a request larger than a scaled budget still passes
    when that budget is untouched, so scaling never makes a request that fits the tenant's real limits
    impossible; standing in, the daily share is strict (a quota is not a rate that refills). Not
    thread-safe: use it from one event loop.
    """

    backend = "local"

    def __init__(
        self,
        *,
        scale: float = 1.0,
        lease_s: float = DEFAULT_LEASE_S,
        concurrency_retry_after_s: float = 1.0,
        max_hold_s: float = DEFAULT_MAX_HOLD_S,
        stand_in: bool = False,
        clock: Callable[[], float] = time.monotonic,
        utcnow: UtcNow = utcnow,
    ):
        if not 0 < scale <= 1:
            raise InvalidArgument(f"local limiter scale must be in (0, 1], got {scale}")
        check_lease(lease_s, concurrency_retry_after_s, max_hold_s)
        self.scale = scale
        self.lease_s = lease_s
        self.concurrency_retry_after_s = concurrency_retry_after_s
        self.stand_in = stand_in
        self._clock = clock
        self._utcnow = utcnow
        self._state: dict[str, _TenantState] = {}
        self._reported: dict[str, tuple[str, int]] = {}  # tenant -> (day, tokens Redis counted that day)
        self.shared_day = ""  # the last UTC day Redis answered on
        self.leases = LeaseKeeper(lease_s, max_hold_s, self._renew, clock)

    @classmethod
    def for_replicas(cls, replicas: int, **kwargs) -> LocalLimiter:
        """The stand-in for Redis of one of ``replicas`` gateway replicas: 1 / replicas of each limit."""
        if not 1 <= replicas <= 100_000:
            raise InvalidArgument(f"replicas must be in [1, 100000], got {replicas}")
        return cls(scale=1.0 / replicas, stand_in=True, **kwargs)

    def observe(self, day: str, tenant: str | None = None, used: int | None = None) -> None:
        """Redis answered on ``day``; for ``tenant`` it counted ``used`` tokens of that day."""
        self.shared_day = max(self.shared_day, day)
        if tenant is not None and used is not None:
            self._reported[tenant] = (day, used)

    def _day_share(self, tenant: str, lim: TenantLimits, day: str, wall: datetime) -> _DayShare:
        quota = lim.daily_token_quota
        if not self.stand_in:
            return _DayShare(_Scaled.of(lim, self.scale).quota, strict=False, left=None)
        reported = self._reported.get(tenant)
        if reported is not None and reported[0] == day:
            left = max(0, quota - reported[1])
        elif self.shared_day and self.shared_day < day:
            left = quota  # the day began after Redis last answered: nothing of it is counted there
        else:
            day_left = seconds_to_utc_midnight(wall) / 86400
            return _DayShare(math.floor(quota * self.scale * day_left), strict=True, left=None)
        return _DayShare(math.floor(left * self.scale), strict=True, left=left)

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
            raise refused(tenant.name, REASON_RATE, (1 - rps) / lim.rate)
        st.leases = {k: exp for k, exp in st.leases.items() if exp > now}
        if len(st.leases) >= lim.concurrent:
            raise refused(tenant.name, REASON_CONCURRENCY, self.concurrency_retry_after_s)
        tpm_rate = lim.tpm / 60.0
        tpm = st.tpm.current(now, tpm_rate, lim.tpm)
        if tpm < estimated_tokens and tpm < lim.tpm:
            raise refused(tenant.name, REASON_TOKENS, (min(estimated_tokens, lim.tpm) - tpm) / tpm_rate)
        share = self._day_share(tenant.name, tenant.limits, day, wall)
        if st.day_used + estimated_tokens > share.tokens and (share.strict or st.day_used > 0):
            # Over the share while the fleet still has room: Redis may answer again soon.
            soon = share.strict and (share.left is None or share.left >= estimated_tokens)
            retry = self.concurrency_retry_after_s if soon else seconds_to_utc_midnight(wall)
            raise refused(tenant.name, REASON_DAILY, retry)

        st.rps.put(rps - 1, now)
        st.tpm.put(tpm - estimated_tokens, now)
        st.day_used += estimated_tokens
        lease_id = uuid.uuid4().hex
        st.leases[lease_id] = now + self.lease_s
        self.leases.hold(lease_id, tenant.name)

        async def settle(adm: Admission, back: int) -> None:
            self.leases.drop(adm.lease_id)
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

    async def _renew(self, held: list[Held]) -> None:
        expiry = self._clock() + self.lease_s
        for h in held:
            st = self._state.get(h.where)
            if st is not None and h.lease_id in st.leases:
                st.leases[h.lease_id] = expiry

    def unsynced_day_usage(self) -> list[tuple[str, str, int]]:
        """(tenant, day, tokens) admitted here and not yet added to Redis's counters."""
        return [(name, st.day, st.day_used) for name, st in self._state.items() if st.day_used > 0]

    def synced(self, tenant: str, day: str, tokens: int) -> None:
        """``tokens`` of ``tenant``'s ``day`` are now in Redis's counter."""
        st = self._state.get(tenant)
        if st is not None and st.day == day:
            st.day_used = max(0, st.day_used - tokens)

    async def close(self) -> None:
        self.leases.close()
        self._state.clear()
