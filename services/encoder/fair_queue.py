"""Which tiles go into the next vision forward: weighted fair share between tenants (pure Python).

Fair share on (the default). Priority classes are strict: tiles of a higher ``priority`` are planned
first. Within a class, the tile budget of the forwards goes to tenants in proportion to their weights,
by virtual-time fair queueing measured in tiles: each tenant has a virtual time (tiles planned /
weight) and the planner hands tiles to the tenant of the highest class with the lowest virtual time,
as many as keep it from passing the next tenant of its class. A tenant that becomes active starts at
the smallest virtual time of the tenants already active, so idle time is not banked. Within a tenant
its share of a forward is water-filled over its requests, smallest remainder first (then arrival), as
the batcher always did: a small image finishes in the next forward even behind the tenant's own
40-tile image.

Starvation: a request that has waited ``max_wait_s`` (from its submission, the caller's clock) is
planned in a class above every priority, so it gets tiles in the first forward planned after that, shared
by weight with requests of other tenants that starved too.

The guarantee is per batcher, that is per encoder replica, and over the forwards it plans: it says
nothing about tiles of another replica, nor about work before the batcher (the cache, tiling).

Fair share off: the old plan, priorities strictly first, then the budget water-filled over every
waiting request of the class (``plan_water_fill``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

STARVED_CLASS = 1 << 30  # above every priority


class Waiting(Protocol):
    seq: int
    priority: int
    tenant: str
    weight: float
    enqueued_at: float
    scheduled: int
    starved: bool

    @property
    def remaining(self) -> int: ...


@dataclass(frozen=True)
class Take:
    """``tiles`` tiles of ``request``, from its next unscheduled one."""

    request: Waiting
    tiles: int


def plan_water_fill(waiting: list[Waiting], budget: int, klass=lambda r: r.priority) -> list[Take]:
    """Priorities strictly first; within one, the budget water-filled, smallest remainder first."""
    chosen: list[Take] = []
    live = [r for r in waiting if r.remaining > 0]
    for level_class in sorted({klass(r) for r in live}, reverse=True):
        if budget <= 0:
            break
        level = sorted((r for r in live if klass(r) == level_class), key=lambda r: (r.remaining, r.seq))
        for i, req in enumerate(level):
            if budget <= 0:
                break
            take = min(req.remaining, max(budget // (len(level) - i), 1))
            chosen.append(Take(req, take))
            budget -= take
    return chosen


class TileFairShare:
    """The planner's state between forwards: virtual times, weights, tiles planned per tenant."""

    def __init__(self, enabled: bool = True, max_wait_s: float = 30.0):
        self.enabled = enabled
        self.max_wait_s = max_wait_s
        self.vtime: dict[str, float] = {}  # active tenants only
        self.weight: dict[str, float] = {}
        self.tiles: dict[str, int] = {}  # tiles planned per tenant (all time)

    def klass(self, req: Waiting, now: float) -> int:
        if not self.enabled:
            return req.priority
        if not req.starved:
            req.starved = now - req.enqueued_at >= self.max_wait_s
        return STARVED_CLASS if req.starved else req.priority

    def plan(self, waiting: list[Waiting], budget: int, now: float) -> list[Take]:
        """The next forward's tiles; charges each tenant for what it is given."""
        if not self.enabled:
            chosen = plan_water_fill(waiting, budget)
        else:
            chosen = self._plan_fair(waiting, budget, now)
        for take in chosen:
            tenant = take.request.tenant
            self.tiles[tenant] = self.tiles.get(tenant, 0) + take.tiles
        return chosen

    def _plan_fair(self, waiting: list[Waiting], budget: int, now: float) -> list[Take]:
        queues: dict[tuple[int, str], list[Waiting]] = {}  # (class, tenant) -> requests
        for req in waiting:
            if req.remaining > 0:
                queues.setdefault((self.klass(req, now), req.tenant), []).append(req)
                self.weight[req.tenant] = req.weight
        floor = min(self.vtime.values(), default=0.0)
        self.vtime = {t: self.vtime.get(t, floor) for _, t in queues}
        left = {q: sum(r.remaining for r in reqs) for q, reqs in queues.items()}
        allotted = dict.fromkeys(queues, 0)
        while budget > 0:
            open_ = [q for q in queues if left[q] > 0]
            if not open_:
                break
            top = max(q[0] for q in open_)
            rivals = sorted((self.vtime[t], t) for c, t in open_ if c == top)
            _, tenant = rivals[0]
            weight = self.weight.get(tenant, 1.0)
            take = min(left[(top, tenant)], budget)
            if len(rivals) > 1:  # only as far as the next tenant of the class
                gap = (rivals[1][0] - self.vtime[tenant]) * weight
                take = min(take, max(1, math.ceil(gap - 1e-9)))
            allotted[(top, tenant)] += take
            left[(top, tenant)] -= take
            budget -= take
            self.vtime[tenant] += take / weight
        chosen: list[Take] = []
        for q in sorted(queues, key=lambda q: -q[0]):
            if allotted[q]:
                chosen.extend(plan_water_fill(queues[q], allotted[q], klass=lambda r: 0))
        return chosen

    def stats(self) -> dict[str, dict[str, float]]:
        """Per tenant: tiles planned (all time), weight, virtual time while active."""
        return {
            t: {"tiles": n, "weight": self.weight.get(t, 1.0), "vtime": self.vtime.get(t, 0.0)}
            for t, n in self.tiles.items()
        }
