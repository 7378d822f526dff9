"""The embedding store: one value per tile plus a small manifest, with TTL and fill locks.

Every backend (``memory.MemoryEmbeddingStore``, ``redis_store.RedisEmbeddingStore``) implements
``EmbeddingStore`` and passes the shared conformance suite (``tests/embedding_cache/store_conformance.py``).
The store keeps books only; it never computes embeddings.

Integrity: the manifest records the dtype, shape and a CRC32 of each tile. A reader that finds a tile
missing, of the wrong length or with a different checksum treats the whole entry as a miss, never
serving a partial or corrupt embedding.
"""

from __future__ import annotations

import abc
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.common.tensors import WireTensor

MANIFEST_VERSION = 1


@dataclass
class StoredEmbedding:
    """One image's embeddings as per-tile tensors of shape (tokens_per_tile, dim)."""

    tiles: list[WireTensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.tiles:
            raise InvalidArgument("a stored embedding has at least one tile")
        first = self.tiles[0]
        if len(first.shape) != 2:
            raise InvalidArgument(f"each tile is (tokens, dim); got shape {first.shape}")
        for t in self.tiles[1:]:
            if t.dtype != first.dtype or t.shape != first.shape:
                raise InvalidArgument("all tiles of an embedding share dtype and shape")

    @property
    def dtype(self) -> str:
        return self.tiles[0].dtype

    @property
    def tokens_per_tile(self) -> int:
        return self.tiles[0].shape[0]

    @property
    def dim(self) -> int:
        return self.tiles[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiles)

    def manifest(self) -> dict[str, Any]:
        return {
            "v": MANIFEST_VERSION,
            "tiles": len(self.tiles),
            "dtype": self.dtype,
            "tile_shape": list(self.tiles[0].shape),
            "crc32": [zlib.crc32(t.data) for t in self.tiles],
            "meta": self.meta,
        }

    def concat(self) -> WireTensor:
        """All tiles as one (tiles * tokens_per_tile, dim) tensor."""
        data = b"".join(bytes(t.data) for t in self.tiles)
        return WireTensor(self.dtype, (len(self.tiles) * self.tokens_per_tile, self.dim), data)

    @classmethod
    def from_tensor(
        cls, tensor: WireTensor, tiles: int, meta: dict[str, Any] | None = None
    ) -> StoredEmbedding:
        """Split a (tiles * tokens_per_tile, dim) tensor into per-tile tensors (views, no copy)."""
        rows, dim = tensor.shape
        if tiles < 1 or rows % tiles:
            raise InvalidArgument(f"{rows} rows do not split into {tiles} tiles")
        per = rows // tiles
        step = per * dim * (tensor.nbytes // max(rows * dim, 1))
        view = memoryview(tensor.data)
        parts = [WireTensor(tensor.dtype, (per, dim), view[i * step : (i + 1) * step]) for i in range(tiles)]
        return cls(parts, dict(meta or {}))


def parse_manifest(raw: bytes | str) -> dict[str, Any] | None:
    """The manifest as a dict, or None if it is not one we can trust."""
    try:
        m = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(m, dict) or m.get("v") != MANIFEST_VERSION:
        return None
    try:
        tiles = int(m["tiles"])
        shape = tuple(int(x) for x in m["tile_shape"])
        crcs = [int(c) for c in m["crc32"]]
        str(m["dtype"])
    except (KeyError, TypeError, ValueError):
        return None
    if tiles < 1 or len(shape) != 2 or len(crcs) != tiles:
        return None
    return m


def verify_tiles(manifest: dict[str, Any], blobs: list[bytes | None]) -> StoredEmbedding | None:
    """Rebuild an entry from its manifest and tile blobs; None if anything is missing or corrupt."""
    if len(blobs) != manifest["tiles"] or any(b is None for b in blobs):
        return None
    shape = tuple(manifest["tile_shape"])
    tiles = []
    for blob, crc in zip(blobs, manifest["crc32"], strict=True):
        if zlib.crc32(blob) != crc:
            return None
        try:
            tiles.append(WireTensor(manifest["dtype"], shape, blob))
        except InvalidArgument:
            return None
    return StoredEmbedding(tiles, dict(manifest.get("meta") or {}))


class EmbeddingStore(abc.ABC):
    """Async key-value store of embeddings. Implementations must pass the conformance suite."""

    #: Largest entry accepted; a larger one is refused by ``put`` (returns False), never truncated.
    max_entry_bytes: int

    @abc.abstractmethod
    async def get(self, key: str) -> StoredEmbedding | None:
        """The entry, or None on a miss, an expired, partial or corrupt entry."""

    @abc.abstractmethod
    async def put(self, key: str, entry: StoredEmbedding, ttl_s: float | None = None) -> bool:
        """Store the entry; False if refused (over ``max_entry_bytes``). ``ttl_s`` None = the default."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def contains(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def acquire_fill_lock(self, key: str, ttl_s: float) -> str | None:
        """Try to become the one filler of ``key``; a token on success, None if another holds it."""

    @abc.abstractmethod
    async def release_fill_lock(self, key: str, token: str) -> None:
        """Release the lock if ``token`` still holds it (an expired lock may belong to someone else)."""

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None
