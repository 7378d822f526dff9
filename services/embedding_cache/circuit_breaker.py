"""A circuit breaker: stop calling a dependency that keeps failing, probe it now and then.

Redis being down must not make every request wait out a timeout. After ``failure_threshold``
consecutive failures the breaker opens and callers skip the dependency at once. ``reprobe_interval_s``
after the last failure one call is let through as a probe (half-open); while it is out every other
call is still skipped. Its success closes the breaker, so the dependency is used again without a
restart; its failure opens it for another interval. A probe that ends with neither (cancelled, or a
bug of ours rather than an outage) is given back with ``end_probe``, and the next call probes.
Pure logic with an injectable clock, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


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
        self._open = False
        self._probing = False
        self._next_probe = 0.0
        self.last_error: str = ""
        self.trips = 0

    @property
    def state(self) -> str:
        if not self._open:
            return CLOSED
        return HALF_OPEN if self._probing else OPEN

    @property
    def is_open(self) -> bool:
        """True from the failure that opened the breaker until a success closes it (probes included)."""
        return self._open

    def allow(self) -> bool:
        """Whether a call may go to the dependency now: always while closed; while open, one probe at
        a time, once ``reprobe_interval_s`` has passed since the last failure."""
        if not self._open:
            return True
        if self._probing or self._clock() < self._next_probe:
            return False
        self._probing = True
        return True

    def end_probe(self) -> None:
        """The call that ``allow`` let through ended without ``record_*`` (a no-op otherwise)."""
        self._probing = False

    def record_success(self) -> bool:
        """Note a success; True if it closed an open breaker (the dependency is back)."""
        self._failures = 0
        self._probing = False
        was_open = self._open
        self._open = False
        return was_open

    def record_failure(self, error: str = "") -> bool:
        """Note a failure; True if it opened the breaker. Every failure while open (a probe's, or a call
        that started before the breaker opened) puts the next probe ``reprobe_interval_s`` away."""
        self._failures += 1
        self._probing = False
        self.last_error = error
        if self._open:
            self._next_probe = self._clock() + self.reprobe_interval_s
            return False
        if self._failures >= self.failure_threshold:
            self._open = True
            self._next_probe = self._clock() + self.reprobe_interval_s
            self.trips += 1
            return True
        return False
