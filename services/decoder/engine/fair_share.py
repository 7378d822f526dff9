"""Who runs next when the pools are full: weighted fair share between tenants (pure Python, no torch).

The scheduler keeps one token-budget loop; this module decides the order in which that loop spends the
budget and whom it preempts.

Fair share on (the default). Priority classes are strict: a request of a higher ``priority`` is always
served first and may preempt lower classes. Within a class, capacity goes to tenants in proportion to
their weights, measured in tokens computed in the decoder, by virtual-time fair queueing: each tenant
has a virtual time (tokens scheduled / weight); the loop always serves the tenant of the highest class
with the lowest virtual time, and charges it for each chunk it schedules (a chunk dropped by a
preemption in the same step is refunded; the recompute after a preemption is charged again). A tenant
that becomes active starts at the smallest virtual time of the tenants already active, so idle time is
not banked. Within a tenant, requests keep priority-then-arrival order; running requests of a tenant
come before its waiting ones.

A waiting request of a tenant under its share that finds no free slot (``max_num_seqs``) or no free KV
blocks preempts a running request of the tenant furthest over its share: slots and KV blocks held per
unit of weight. It does so only while that tenant stays over the waiting tenant's share after the
admission, so two tenants never trade a slot back and forth. A request of a lower class is always a
candidate, a request of a higher class never. A tenant's ``max_kv_share`` caps the fraction of the KV
blocks its running requests hold together: over it, its requests wait, and a running one that must grow
preempts the tenant's own latest request.

Starvation: a request that has waited ``max_wait_s`` (the scheduler's clock) is served in a class above
every priority until it finishes, among such requests by fair share. So a lower class waits at most
``max_wait_s`` plus the time the requests that starved before it take to be admitted.

Fair share off: every request belongs to one group, there are no caps, and the order is the old one:
running requests first, then waiting ones, each by priority then arrival; a preemption takes the
lowest-priority latest request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.decoder.engine.request import Request, RequestStatus

STARVED_CLASS = 1 << 30  # above every priority


@dataclass
class StepQueues:
    """The requests of one step, per group, each group's in its own order (``pop`` gives the best)."""

    policy: FairShare
    items: dict[str, list[tuple[tuple, Request, bool]]] = field(default_factory=dict)  # key, request, running
    heads: dict[str, int] = field(default_factory=dict)

    def pop(self) -> tuple[Request, bool] | None:
        """The next request and whether it was running when the step began."""
        best, best_key = None, None
        for group, items in self.items.items():
            i = self.heads[group]
            if i >= len(items):
                continue
            key = self.policy.pick_key(group, items[i][0])
            if best_key is None or key < best_key:
                best, best_key = group, key
        if best is None:
            return None
        i = self.heads[best]
        self.heads[best] = i + 1
        _, req, running = self.items[best][i]
        return req, running

    def drop_waiting(self, group: str) -> None:
        """This step admits no more waiting requests of ``group`` (they keep their order)."""
        self.items[group] = [it for k, it in enumerate(self.items[group]) if k < self.heads[group] or it[2]]


class FairShare:
    def __init__(self, enabled: bool, max_wait_s: float, num_blocks: int):
        self.enabled = enabled
        self.max_wait_s = max_wait_s
        self.num_blocks = num_blocks
        self.vtime: dict[str, float] = {}  # active tenants only
        self.weight: dict[str, float] = {}
        self.tokens: dict[str, int] = {}  # tokens scheduled per tenant (all time)
        self.queue_s: dict[str, float] = {}  # seconds its requests waited before each admission
        self.admissions: dict[str, int] = {}
        self.passed_over: dict[str, int] = {}  # admissions of other tenants while one of its waited

    # -- classes and keys ------------------------------------------------------------------------
    def group(self, req: Request) -> str:
        return req.tenant if self.enabled else ""

    def klass(self, req: Request, now: float) -> int:
        if not self.enabled:
            return req.priority
        if not req.starved and req.status != RequestStatus.RUNNING:
            req.starved = now - req.waiting_since >= self.max_wait_s
        return STARVED_CLASS if req.starved else req.priority

    def item_key(self, req: Request, now: float) -> tuple:
        waiting = req.status != RequestStatus.RUNNING
        if not self.enabled:
            return (waiting, *req.sort_key())
        return (-self.klass(req, now), waiting, *req.sort_key())

    def pick_key(self, group: str, item_key: tuple) -> tuple:
        if not self.enabled:
            return item_key
        return (item_key[0], self.vtime[group], *item_key[1:])

    def begin_step(self, running: list[Request], waiting: list[Request], now: float) -> StepQueues:
        queues = StepQueues(self)
        for req in running + waiting:
            key = self.item_key(req, now)
            running_now = req.status == RequestStatus.RUNNING
            queues.items.setdefault(self.group(req), []).append((key, req, running_now))
        for group, items in queues.items.items():
            items.sort(key=lambda it: it[0])
            queues.heads[group] = 0
        floor = min(self.vtime.values(), default=0.0)
        self.vtime = {g: self.vtime.get(g, floor) for g in queues.items}
        return queues

    # -- accounting --------------------------------------------------------------------------------
    def note(self, req: Request) -> None:
        self.weight[req.tenant] = req.weight

    def charge(self, req: Request, num_tokens: int) -> None:
        self.tokens[req.tenant] = self.tokens.get(req.tenant, 0) + num_tokens
        if self.enabled:
            group = self.group(req)
            self.vtime[group] = self.vtime.get(group, 0.0) + num_tokens / req.weight

    def admit(self, req: Request, waiting: list[Request], now: float) -> None:
        """Count an admission: ``req``'s wait, and each other tenant with a request of at least its class
        still waiting (admitted ahead of it: the figure fair share keeps at zero)."""
        tenant = req.tenant
        self.queue_s[tenant] = self.queue_s.get(tenant, 0.0) + max(0.0, now - req.waiting_since)
        self.admissions[tenant] = self.admissions.get(tenant, 0) + 1
        mine = self.klass(req, now)
        for other in {w.tenant for w in waiting if w.tenant != tenant and self.klass(w, now) >= mine}:
            self.passed_over[other] = self.passed_over.get(other, 0) + 1

    def stats(self, running: list[Request], waiting: list[Request]) -> dict[str, dict[str, float]]:
        """Per tenant: tokens scheduled, admissions, seconds waited before them, admissions of others
        ahead of its waiting requests, requests running and waiting, KV blocks held now."""
        now: dict[str, list[int]] = {}  # tenant -> [running, waiting, KV blocks]: one pass (every step)
        for r in running:
            row = now.setdefault(r.tenant, [0, 0, 0])
            row[0] += 1
            row[2] += len(r.block_ids)
        for r in waiting:
            now.setdefault(r.tenant, [0, 0, 0])[1] += 1
        out = {}
        for t in sorted(set(self.tokens) | set(self.admissions) | set(now)):
            running_now, waiting_now, blocks = now.get(t, (0, 0, 0))
            out[t] = {
                "tokens": self.tokens.get(t, 0),
                "admissions": self.admissions.get(t, 0),
                "queue_s": self.queue_s.get(t, 0.0),
                "passed_over": self.passed_over.get(t, 0),
                "running": running_now,
                "waiting": waiting_now,
                "kv_blocks": blocks,
                "weight": self.weight.get(t, 1.0),
            }
        return out

    def blocks_held(self, group: str, running: list[Request]) -> int:
        return sum(len(r.block_ids) for r in running if self.group(r) == group)

    def kv_cap(self, req: Request) -> int | None:
        if not self.enabled or req.max_kv_share is None:
            return None
        return max(1, int(req.max_kv_share * self.num_blocks))

    # -- victims -----------------------------------------------------------------------------------
    def _worst(self, candidates: list[Request], score, now: float) -> Request | None:
        """The lowest class, then the tenant furthest over its share, then the latest request."""
        if not candidates:
            return None
        return max(candidates, key=lambda r: (-self.klass(r, now), score(r), r.sort_key()))

    def _per_weight(self, running: list[Request], measure) -> dict[str, float]:
        held: dict[str, float] = {}
        for r in running:
            held[self.group(r)] = held.get(self.group(r), 0.0) + measure(r)
        return {g: h / self.weight.get(g, 1.0) for g, h in held.items()}

    def running_victim(self, req: Request, running: list[Request], now: float) -> Request | None:
        """Whom to preempt when running ``req`` finds no free block (``req`` itself, possibly)."""
        mine = self.klass(req, now)
        share = self._per_weight(running, lambda r: len(r.block_ids)) if self.enabled else {}
        candidates = [r for r in running if self.klass(r, now) <= mine]
        return self._worst(candidates, lambda r: share.get(self.group(r), 0.0), now)

    def own_latest(self, req: Request, running: list[Request]) -> Request:
        return max((r for r in running if self.group(r) == self.group(req)), key=Request.sort_key)

    def admission_victim(
        self, req: Request, running: list[Request], now: float, *, slots: bool, need: int = 1
    ) -> Request | None:
        """Whom a waiting ``req`` may preempt for a slot (``slots``) or for ``need`` KV blocks: a
        lower class; with fair share also a tenant of its class still over ``req``'s tenant's share
        (slots or blocks per weight) once ``req`` is admitted."""
        if slots and not self.enabled:
            return None  # the old order: a waiting request waits for a free slot
        mine, group = self.klass(req, now), self.group(req)
        measure = (lambda r: 1.0) if slots else (lambda r: float(len(r.block_ids)))
        share = self._per_weight(running, measure) if self.enabled else {}
        after = share.get(group, 0.0) + need / req.weight

        def eligible(r: Request) -> bool:
            theirs = self.klass(r, now)
            if theirs < mine:
                return True
            return self.enabled and theirs == mine and self.group(r) != group and share[self.group(r)] > after

        candidates = [r for r in running if eligible(r)]
        return self._worst(candidates, lambda r: share.get(self.group(r), 0.0), now)
