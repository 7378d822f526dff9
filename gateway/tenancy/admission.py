"""What every limiter shares: the refusal reasons, the checks on a request's estimate, the ``Admission``
an admitted request holds, and the ``LeaseKeeper`` that keeps its concurrency lease alive.

A concurrency slot is a lease with an expiry (``lease_s``), so a replica that dies holding slots cannot
leak them for longer than one lease. A request may run far longer than one lease (a stream of
``gateway.max_timeout_s``), so the limiter that admitted it renews the lease every ``lease_s / 3`` until
the request settles (or ``max_hold_s`` after admission, a bound no request outlives): one renewal loop
per limiter, not one per request. A replica that dies stops renewing, and its slots lapse within one
lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.tenancy.config import Tenant
from services.common.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("gateway.tenancy.limiter")

REASON_RATE = "rate_limited"
REASON_TOKENS = "tokens_per_min"
REASON_CONCURRENCY = "concurrency"
REASON_DAILY = "daily_quota"
REASONS = {1: REASON_RATE, 2: REASON_CONCURRENCY, 3: REASON_TOKENS, 4: REASON_DAILY}
_MESSAGES = {
    REASON_RATE: "request rate limit reached",
    REASON_CONCURRENCY: "too many requests in flight",
    REASON_TOKENS: "tokens-per-minute limit reached",
    REASON_DAILY: "daily token quota used up",
}
DAY_KEY_TTL_S = 2 * 86400
DEFAULT_LEASE_S = 300.0
DEFAULT_MAX_HOLD_S = 86400.0
# Exceptions that mean "Redis is not answering", as opposed to a bug in a script or a bad argument.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

UtcNow = Callable[[], datetime]


def is_redis_down(exc: BaseException) -> bool:
    """Redis cannot serve now: unreachable, too slow, read-only, loading, or refusing writes because it
    is full under ``noeviction`` (``OOM``) or cannot persist (``MISCONF``). Anything else is a bug."""
    if isinstance(exc, (*REDIS_DOWN, BusyLoadingError, OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and ("OOM" in text or "'maxmemory'" in text or "MISCONF" in text)


def utcnow() -> datetime:
    return datetime.now(UTC)


def utc_day(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d")


def seconds_to_utc_midnight(now: datetime) -> float:
    now = now.astimezone(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - now).total_seconds())


def refused(tenant: str, reason: str, retry_after: float) -> ResourceExhausted:
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
                f"request needs up to {estimated_tokens} tokens (prompt + n x max_tokens), more than tenant "
                f"{tenant.name!r}'s {field_name} of {cap}; lower max_tokens or n",
                reason=f"{field_name}_exceeded",
            )


def check_lease(lease_s: float, concurrency_retry_after_s: float, max_hold_s: float) -> None:
    if not 0.05 <= lease_s <= 86400:
        raise InvalidArgument(f"lease_s must be in [0.05, 86400], got {lease_s}")
    if not 0 < concurrency_retry_after_s <= 3600:
        raise InvalidArgument(
            f"concurrency_retry_after_s must be in (0, 3600], got {concurrency_retry_after_s}"
        )
    if not 0 < max_hold_s <= 7 * 86400:
        raise InvalidArgument(f"max_hold_s must be in (0, 604800], got {max_hold_s}")


Settle = Callable[["Admission", int], Awaitable[None]]


class Admission:
    """One admitted request's hold on its tenant's limits: a concurrency slot and a token reservation.

    Call ``complete(actual_tokens)`` when the request ends, or ``release()`` if it failed before using
    anything; both are idempotent (only the first call counts) and never raise for a backend outage
    (the lease then expires by itself). ``async with admission:`` releases on exit unless completed.
    Until then the limiter keeps the slot's lease alive.
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


@dataclass(frozen=True)
class Held:
    """A lease being kept alive: its id, where it lives (a Redis key or a tenant name) and until when
    (monotonic seconds) it may be renewed at most."""

    lease_id: str
    where: str
    until: float


Renew = Callable[[list[Held]], Awaitable[None]]


class LeaseKeeper:
    """Renews the leases of a limiter's live admissions every ``lease_s / 3``, all in one call of
    ``renew`` per tick, until each is dropped (settled) or reaches its ``max_hold_s``.

    The loop runs only while something is held (it ends when nothing is, and starts again with the next
    hold), so it is bounded; ``close()`` stops it (what a replica's death does: its leases then lapse).
    ``renew`` must not raise for an outage (the leases then lapse by themselves, within one lease).
    """

    def __init__(
        self,
        lease_s: float,
        max_hold_s: float,
        renew: Renew,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every_s = lease_s / 3
        self.max_hold_s = max_hold_s
        self._renew = renew
        self._clock = clock
        self._held: dict[str, Held] = {}
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, lease_id: str, where: str) -> None:
        if self._closed:
            return
        self._held[lease_id] = Held(lease_id, where, self._clock() + self.max_hold_s)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="lease-keeper")

    def drop(self, lease_id: str) -> None:
        self._held.pop(lease_id, None)

    async def _run(self) -> None:
        while self._held and not self._closed:
            await asyncio.sleep(self.every_s)
            now = self._clock()
            for lease_id in [k for k, h in self._held.items() if h.until <= now]:
                del self._held[lease_id]  # held past any request's deadline: let it lapse
            if self._held:
                try:
                    await self._renew(list(self._held.values()))
                except Exception as exc:  # the loop must survive anything; leases lapse if it fails
                    log.warning("could not renew %d leases (%s)", len(self._held), type(exc).__name__)

    def close(self) -> None:
        self._closed = True
        self._held.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None
