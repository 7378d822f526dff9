"""Which free KV block an allocation takes: the prefix cache's eviction order (pure Python, no torch).

A free block either holds nothing worth keeping (never written, or written but not a full registered
block) or keeps the hash of a cached prefix block that a later request may reuse. Allocation takes
blocks of the first kind first, the one freed last first, and evicts a cached block only when none is
left.

Which cached block: with fair share between tenants, the cache is shared like the decoder's other
capacity. A block belongs to the tenant whose request took it from the free queue, while that request
(or one sharing its prefix) holds it and, once freed with a hash, as one of the tenant's cached blocks.
Each tenant's cached blocks wait in a queue of their own, least recently freed first (the tail of a
sequence before its head, so what is left of a prefix still matches). An eviction takes the head of the
queue of the tenant furthest over its share of the cache: the most blocks, held and cached, per unit of
weight (ties: the older head). So a tenant that floods the decoder with distinct prompts evicts its own
prefixes before those of a tenant within its share. A tenant's weight is its latest request's. Choosing
costs one pass over the tenants that have cached blocks, never one over the blocks.

Fair share off: one queue for everyone, least recently freed first (plain LRU).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict


class FreeQueue:
    def __init__(self, num_blocks: int, fair: bool = True):
        self.fair = fair
        self.unhashed: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[str, OrderedDict[int, None]] = {}  # tenant -> its free cached blocks, LRU first
        self.held: dict[str, int] = {}  # tenant -> blocks its requests hold
        self.weight: dict[str, float] = {}
        self.owner: list[str | None] = [None] * num_blocks
        self._freed_at: dict[int, int] = {}  # free cached block -> when it was freed (ties)
        self._clock = itertools.count()
        self.num_cached = 0

    def __len__(self) -> int:
        return len(self.unhashed) + self.num_cached

    def blocks_of(self, tenant: str) -> tuple[int, int]:
        """Blocks ``tenant``'s requests hold, and its free cached blocks (everyone's with fair share off)."""
        group = self._group(tenant)
        return self.held.get(group, 0), len(self.cached.get(group, ()))

    def _group(self, tenant: str) -> str:
        return tenant if self.fair else ""

    # -- out: a request takes a block --------------------------------------------------------------
    def pop(self, tenant: str, weight: float) -> int:
        """A block for a request of ``tenant`` (the caller forgets its hash); IndexError when none."""
        if self.unhashed:
            block_id = self.unhashed.popitem(last=False)[0]
        elif self.cached:
            group = max(self.cached, key=self._eviction_key)
            block_id = next(iter(self.cached[group]))
            self._uncache(block_id)
        else:
            raise IndexError("no free KV block")
        self._hold(block_id, tenant, weight)
        return block_id

    def take(self, block_id: int, tenant: str, weight: float) -> None:
        """A prefix hit of a request of ``tenant`` reuses the free cached block ``block_id``."""
        self._uncache(block_id)
        self._hold(block_id, tenant, weight)

    def _hold(self, block_id: int, tenant: str, weight: float) -> None:
        group = self._group(tenant)
        self.owner[block_id] = group
        self.weight[group] = weight
        self.held[group] = self.held.get(group, 0) + 1

    def _uncache(self, block_id: int) -> None:
        group = self.owner[block_id]
        del self._freed_at[block_id]
        queue = self.cached[group]
        del queue[block_id]
        if not queue:
            del self.cached[group]
        self.num_cached -= 1

    def _eviction_key(self, group: str) -> tuple[float, int]:
        """Blocks held and cached per weight (the highest goes first), then the older head."""
        queue = self.cached[group]
        return (self.held.get(group, 0) + len(queue)) / self.weight[group], -self._freed_at[next(iter(queue))]

    # -- in: the last request holding a block frees it ------------------------------------------------
    def release(self, block_id: int, cached: bool) -> None:
        """``block_id`` is free; ``cached``: it keeps a prefix's hash (evicted last, by its tenant's share),
        else the next allocation takes it."""
        group = self.owner[block_id]
        self.held[group] -= 1
        if not self.held[group]:
            del self.held[group]
        if cached:
            self.cached.setdefault(group, OrderedDict())[block_id] = None
            self._freed_at[block_id] = next(self._clock)
            self.num_cached += 1
        else:
            self.owner[block_id] = None
            self.unhashed[block_id] = None
            self.unhashed.move_to_end(block_id, last=False)
