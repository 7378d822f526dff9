"""The circuit breaker on a hand-driven clock: it opens after the threshold, lets one probe through an
interval after the last failure (never two at once), and closes on the probe's success."""

from __future__ import annotations

import pytest

from services.embedding_cache.circuit_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 2, interval: float = 1.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(threshold, interval, clock), clock


def test_opens_after_the_threshold_of_consecutive_failures():
    b, _ = breaker(threshold=2)
    assert not b.record_failure("one")
    assert b.record_success() is False  # a success in between starts the count again
    assert not b.record_failure("one")
    assert b.allow() and b.state == CLOSED
    assert b.record_failure("two") and b.is_open and b.state == OPEN
    assert b.trips == 1 and b.last_error == "two"
    assert not b.allow()


def test_one_probe_at_a_time_an_interval_after_the_last_failure():
    b, clock = breaker(threshold=1, interval=1.0)
    b.record_failure("down")
    clock.now += 0.99
    assert not b.allow()
    clock.now += 0.01
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()  # the probe is still out: everyone else still skips
    clock.now += 5.0
    assert not b.allow()  # however long it takes
    clock.now += 0.5
    assert not b.record_failure("still down")  # already open: no new trip
    assert b.trips == 1 and b.state == OPEN
    clock.now += 0.99
    assert not b.allow()  # the interval counts from the probe's failure, not from its start
    clock.now += 0.01
    assert b.allow()
    assert b.record_success() and b.state == CLOSED and not b.is_open
    assert b.allow() and b.allow()


def test_a_probe_given_back_lets_the_next_call_probe():
    b, clock = breaker(threshold=1, interval=1.0)
    b.record_failure("down")
    clock.now += 1.0
    assert b.allow()
    b.end_probe()  # cancelled, or a bug of ours: no answer either way
    assert b.is_open and b.allow()


def test_every_failure_while_open_moves_the_next_probe():
    b, clock = breaker(threshold=1, interval=1.0)
    b.record_failure("first")
    clock.now += 0.8
    b.record_failure("a call that started before the breaker opened")
    clock.now += 0.8
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()


@pytest.mark.parametrize("threshold,interval", [(0, 1.0), (1, 0.0)])
def test_bounds(threshold, interval):
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, interval)
