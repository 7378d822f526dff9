"""The in-process embedding store: an LRU bounded by bytes, with per-entry TTL and fill locks."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

from services.common.errors import InvalidArgument
from services.embedding_cache.store import EmbeddingStore, StoredEmbedding, verify_tiles


class MemoryEmbeddingStore(EmbeddingStore):
    """In-process store: LRU bounded by bytes, per-entry TTL. The first level in front of Redis, and
    the whole store in the embedded default when no Redis is configured.

    Entries are kept as manifest + tile blobs, exactly as a remote backend keeps them, and read back
    through the same verification, so damage is detected here too.
    """

    def __init__(
        self, max_bytes: int = 1 << 30, default_ttl_s: float = 3600.0, max_entry_bytes: int = 256 << 20
    ):
        if max_bytes < 1 or max_entry_bytes < 1 or default_ttl_s <= 0:
            raise InvalidArgument("memory store bounds must be positive")
        self.max_bytes = max_bytes
        self.default_ttl_s = default_ttl_s
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._entries: OrderedDict[str, tuple[float, dict[str, Any], list[bytes]]] = OrderedDict()
        self._bytes = 0
        self._locks: dict[str, tuple[float, str]] = {}

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> StoredEmbedding | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, manifest, blobs = item
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return verify_tiles(manifest, list(blobs))

    async def put(self, key: str, entry: StoredEmbedding, ttl_s: float | None = None) -> bool:
        size = entry.nbytes
        if size > self.max_entry_bytes:
            return False
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise InvalidArgument("ttl_s must be positive")
        blobs = [bytes(t.data) for t in entry.tiles]  # own the bytes: the caller's buffers may be reused
        self._drop(key)
        self._entries[key] = (time.monotonic() + ttl, entry.manifest(), blobs)
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        return True

    async def delete(self, key: str) -> None:
        self._drop(key)

    async def contains(self, key: str) -> bool:
        return await self.get(key) is not None

    async def acquire_fill_lock(self, key: str, ttl_s: float) -> str | None:
        # Single event loop, no await between the check and the set: atomic without a mutex.
        now = time.monotonic()
        held = self._locks.get(key)
        if held is not None and held[0] > now:
            return None
        token = secrets.token_hex(8)
        self._locks[key] = (now + ttl_s, token)
        return token

    async def release_fill_lock(self, key: str, token: str) -> None:
        held = self._locks.get(key)
        if held is not None and held[1] == token:
            del self._locks[key]

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= sum(len(b) for b in item[2])

    def corrupt_for_test(self, key: str, *, truncate: bool = False) -> None:
        """Damage a stored tile in place, as a failing backend could (conformance suite only)."""
        _, _, blobs = self._entries[key]
        blobs[-1] = blobs[-1][:-1] if truncate else bytes([blobs[-1][0] ^ 0xFF]) + blobs[-1][1:]
