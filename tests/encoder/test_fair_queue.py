"""Weighted fair share of the vision forwards' tiles between tenants: the planner with hand-made
requests and an injected clock (no model); each figure is counted from the planner's own plans."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from services.encoder.fair_queue import TileFairShare

_seq = itertools.count()


@dataclass(eq=False)
class Req:
    tenant: str
    total: int
    weight: float = 1.0
    priority: int = 0
    enqueued_at: float = 0.0
    seq: int = 0
    scheduled: int = 0
    starved: bool = False

    def __post_init__(self):
        self.seq = next(_seq)

    @property
    def remaining(self) -> int:
        return self.total - self.scheduled


def forward(policy: TileFairShare, waiting: list[Req], budget: int, now: float = 0.0) -> dict[str, int]:
    """Plan one forward and run it: tiles per tenant; finished requests leave the queue."""
    got: dict[str, int] = {}
    for take in policy.plan(waiting, budget, now):
        assert 0 < take.tiles <= take.request.remaining
        take.request.scheduled += take.tiles
        got[take.request.tenant] = got.get(take.request.tenant, 0) + take.tiles
    waiting[:] = [r for r in waiting if r.remaining > 0]
    return got


def saturate(weights: dict[str, float], fair: bool, forwards: int = 300, budget: int = 32) -> dict[str, int]:
    """Tenants that always have many-tile images waiting: tiles per tenant over ``forwards`` forwards."""
    policy, waiting = TileFairShare(fair), []
    tiles = dict.fromkeys(weights, 0)
    for k in range(forwards):
        for tenant, w in weights.items():
            while sum(r.remaining for r in waiting if r.tenant == tenant) < 2 * budget:
                waiting.append(Req(tenant, 7 + (k * 5 + len(waiting)) % 7, weight=w))
        for tenant, n in forward(policy, waiting, budget).items():
            tiles[tenant] += n
    assert sum(tiles.values()) == forwards * budget  # every forward full
    return tiles


@pytest.mark.parametrize("budget", [32, 8, 100])
def test_weights_3_to_1_share_the_tiles_3_to_1(budget):
    tiles = saturate({"A": 3.0, "B": 1.0}, fair=True, budget=budget)
    assert abs(tiles["A"] / sum(tiles.values()) - 0.75) <= 0.05, tiles


def test_three_tenants_share_by_weight():
    tiles = saturate({"A": 1.0, "B": 2.0, "C": 5.0}, fair=True, forwards=400)
    total = sum(tiles.values())
    for tenant, w in {"A": 1, "B": 2, "C": 5}.items():
        assert abs(tiles[tenant] / total - w / 8) <= 0.03, tiles


def test_without_fair_share_weights_do_nothing():
    tiles = saturate({"A": 3.0, "B": 1.0}, fair=False)
    assert abs(tiles["A"] / sum(tiles.values()) - 0.5) <= 0.05, tiles  # the old water-fill: even


def flood_then_one(fair: bool) -> tuple[int, int]:
    """A queues 30 eight-tile images, then B one of four tiles: the forwards until B is done, and A's
    tiles planned in them."""
    policy, waiting = TileFairShare(fair), [Req("A", 8) for _ in range(30)]
    forward(policy, waiting, 16)
    b = Req("B", 4)
    waiting.append(b)
    a_tiles = 0
    for k in range(1, 100):
        a_tiles += forward(policy, waiting, 16).get("A", 0)
        if b.remaining == 0:
            return k, a_tiles
    raise AssertionError("B was never encoded")


def test_a_single_image_is_not_queued_behind_another_tenants_flood():
    forwards, a_tiles = flood_then_one(True)
    assert forwards == 1 and a_tiles == 12  # B's 4 tiles in the next forward; A fills the rest


def test_one_tenant_is_water_filled_as_before():
    # the tenant's own small image is not queued behind its 40-tile image
    policy, big, small = TileFairShare(True), Req("A", 40), Req("A", 2)
    takes = {t.request.seq: t.tiles for t in policy.plan([big, small], 8, 0.0)}
    assert takes == {small.seq: 2, big.seq: 6}


def test_a_new_tenant_does_not_bank_idle_time():
    policy, waiting = TileFairShare(True), [Req("A", 8) for _ in range(50)]
    for _ in range(10):
        forward(policy, waiting, 16)  # A alone: 160 tiles
    waiting += [Req("B", 8) for _ in range(50)]
    got = [forward(policy, waiting, 16) for _ in range(10)]
    assert all(g.get("A", 0) == 8 and g.get("B", 0) == 8 for g in got), got


def test_priority_is_strict_until_the_wait_bound():
    policy = TileFairShare(True, max_wait_s=10.0)
    low = Req("L", 4, priority=0, enqueued_at=0.0)
    waiting = [low] + [Req("H", 8, priority=5, enqueued_at=0.0) for _ in range(100)]
    for now in range(10):  # high priority saturates every forward: the low one waits ...
        assert forward(policy, waiting, 16, now=float(now)) == {"H": 16}
    assert forward(policy, waiting, 16, now=10.0).get("L") == 4  # ... until it has waited max_wait_s
    assert low.remaining == 0


def test_without_fair_share_priority_has_no_bound():
    policy = TileFairShare(False, max_wait_s=10.0)
    low = Req("L", 4, priority=0)
    waiting = [low] + [Req("H", 8, priority=5) for _ in range(100)]
    for now in range(40):
        forward(policy, waiting, 16, now=float(now))
    assert low.remaining == 4


def test_stats_count_tiles_per_tenant():
    policy, waiting = TileFairShare(True), [Req("A", 5, weight=2.0), Req("B", 3)]
    forward(policy, waiting, 32)
    stats = policy.stats()
    assert stats["A"]["tiles"] == 5 and stats["B"]["tiles"] == 3 and stats["A"]["weight"] == 2.0
