"""A circuit breaker: stop calling a dependency that keeps failing, probe it now and then.

Redis being down must not make every request wait out a timeout. After ``failure_threshold``
consecutive failures the breaker opens and callers skip the dependency at once; every
``reprobe_interval_s`` one call is let through as a probe, and its success closes the breaker, so
caching resumes without a restart. Pure logic with an injectable clock, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 2,
        reprobe_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failure_threshold < 1 or reprobe_interval_s <= 0:
            raise ValueError("failure_threshold >= 1 and reprobe_interval_s > 0 are required")
        self.failure_threshold = failure_threshold
        self.reprobe_interval_s = reprobe_interval_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._next_probe = 0.0
        self.last_error: str = ""
        self.trips = 0

    @property
    def state(self) -> str:
        return OPEN if self._opened_at is not None else CLOSED

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to the dependency now (always when closed; one probe per interval when open)."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now >= self._next_probe:
            self._next_probe = now + self.reprobe_interval_s
            return True
        return False

    def record_success(self) -> bool:
        """Note a success; True if it closed an open breaker (the dependency is back)."""
        self._failures = 0
        was_open = self._opened_at is not None
        self._opened_at = None
        return was_open

    def record_failure(self, error: str = "") -> bool:
        """Note a failure; True if it opened the breaker."""
        self._failures += 1
        self.last_error = error
        if self._opened_at is None and self._failures >= self.failure_threshold:
            now = self._clock()
            self._opened_at = now
            self._next_probe = now + self.reprobe_interval_s
            self.trips += 1
            return True
        return False
