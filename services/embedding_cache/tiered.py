"""An in-process LRU in front of the shared store.

The LRU makes a hot image cost no Redis traffic at all on this replica, and it keeps answering
repeats while Redis is down. It is only a first level: a ``cache`` reference must name an entry that
other processes can read, so ``lookup`` says whether the shared level holds the entry too (and writes
an LRU entry back to the shared level when Redis has lost it, e.g. after a Redis restart).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.embedding_cache.errors import StoreUnavailable
from services.embedding_cache.memory import MemoryEmbeddingStore
from services.embedding_cache.store import EmbeddingStore, StoredEmbedding

LEVEL_LRU = "lru"
LEVEL_SHARED = "shared"


@dataclass(frozen=True)
class Lookup:
    entry: StoredEmbedding
    level: str  # where it was found: "lru" or "shared"
    shared: bool  # whether the shared store holds it (a cache reference may name it)


class TieredEmbeddingStore(EmbeddingStore):
    """``front`` (in-process, may be None) over ``back`` (shared, may be None).

    As an ``EmbeddingStore`` it reads front then back (filling the front) and writes both; the shared
    level's ``StoreUnavailable`` propagates from ``get``/``put`` so callers know they are degraded.
    """

    def __init__(
        self, front: MemoryEmbeddingStore | None, back: EmbeddingStore | None, ttl_s: float | None = None
    ):
        if front is None and back is None:
            raise ValueError("a tiered store needs at least one level")
        self.front = front
        self.back = back
        self.ttl_s = ttl_s
        self.max_entry_bytes = (back or front).max_entry_bytes  # type: ignore[union-attr]

    async def lookup(self, key: str) -> Lookup | None:
        """The entry and where it lives; raises ``StoreUnavailable`` only when no level has it."""
        if self.front is not None:
            entry = await self.front.get(key)
            if entry is not None:
                return Lookup(entry, LEVEL_LRU, await self._ensure_shared(key, entry))
        if self.back is None:
            return None
        entry = await self.back.get(key)
        if entry is None:
            return None
        if self.front is not None:
            await self.front.put(key, entry)
        return Lookup(entry, LEVEL_SHARED, True)

    async def _ensure_shared(self, key: str, entry: StoredEmbedding) -> bool:
        if self.back is None:
            return False
        try:
            return await self.back.contains(key) or await self.back.put(key, entry, self.ttl_s)
        except StoreUnavailable:
            return False

    async def get(self, key: str) -> StoredEmbedding | None:
        if self.front is not None:
            entry = await self.front.get(key)
            if entry is not None:
                return entry
        if self.back is None:
            return None
        entry = await self.back.get(key)
        if entry is not None and self.front is not None:
            await self.front.put(key, entry)
        return entry

    async def put(self, key: str, entry: StoredEmbedding, ttl_s: float | None = None) -> bool:
        """Write both levels; the result is the shared level's (the front's without one)."""
        if self.front is not None:
            # The front never outlives what the caller asked for; otherwise it keeps its own, shorter TTL.
            front_ttl = ttl_s if ttl_s is not None and ttl_s < self.front.default_ttl_s else None
            stored = await self.front.put(key, entry, front_ttl)
            if self.back is None:
                return stored
        return await self.back.put(key, entry, ttl_s if ttl_s is not None else self.ttl_s)  # type: ignore[union-attr]

    async def delete(self, key: str) -> None:
        if self.front is not None:
            await self.front.delete(key)
        if self.back is not None:
            await self.back.delete(key)

    async def contains(self, key: str) -> bool:
        if self.front is not None and await self.front.contains(key):
            return True
        return self.back is not None and await self.back.contains(key)

    async def acquire_fill_lock(self, key: str, ttl_s: float) -> str | None:
        return await (self.back or self.front).acquire_fill_lock(key, ttl_s)  # type: ignore[union-attr]

    async def release_fill_lock(self, key: str, token: str) -> None:
        await (self.back or self.front).release_fill_lock(key, token)  # type: ignore[union-attr]

    async def healthy(self) -> bool:
        return self.back is None or await self.back.healthy()

    async def close(self) -> None:
        if self.back is not None:
            await self.back.close()
