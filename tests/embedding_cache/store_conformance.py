"""The conformance suite every ``EmbeddingStore`` backend must pass.

A backend's test module subclasses ``StoreConformance`` and provides two fixtures:
``store`` (a fresh, empty store whose default TTL is at least a minute) and ``corrupt`` (a callable
``corrupt(store, key, truncate=False)`` that damages one stored tile the way a failing backend could).
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from services.common.tensors import WireTensor
from services.embedding_cache.store import StoredEmbedding


def make_entry(tiles: int = 3, rows: int = 256, dim: int = 16, dtype: str = "float32", seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(tiles):
        if dtype == "bfloat16":
            arr = rng.integers(0, 2**16, size=(rows, dim), dtype=np.uint16)
        else:
            arr = rng.standard_normal((rows, dim)).astype(dtype)
        parts.append(WireTensor.from_numpy(arr, dtype=dtype))
    return StoredEmbedding(parts, {"grid": [tiles, 1], "seed": seed})


def same(a: StoredEmbedding, b: StoredEmbedding) -> bool:
    return (
        len(a.tiles) == len(b.tiles)
        and all(
            x.dtype == y.dtype and x.shape == y.shape and bytes(x.data) == bytes(y.data)
            for x, y in zip(a.tiles, b.tiles)
        )
        and a.meta == b.meta
    )


def key() -> str:
    return f"conformance:{uuid.uuid4().hex}"


class StoreConformance:
    async def test_miss(self, store):
        assert await store.get(key()) is None
        assert not await store.contains(key())

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
    async def test_roundtrip_is_exact(self, store, dtype):
        k, entry = key(), make_entry(dtype=dtype)
        assert await store.put(k, entry)
        got = await store.get(k)
        assert got is not None and same(got, entry)
        assert await store.contains(k)

    async def test_overwrite_replaces(self, store):
        k = key()
        await store.put(k, make_entry(tiles=2, seed=1))
        await store.put(k, make_entry(tiles=5, seed=2))
        got = await store.get(k)
        assert got is not None and same(got, make_entry(tiles=5, seed=2))

    async def test_delete(self, store):
        k = key()
        await store.put(k, make_entry())
        await store.delete(k)
        assert await store.get(k) is None

    async def test_keys_are_isolated(self, store):
        a, b = key(), key()
        await store.put(a, make_entry(seed=1))
        assert await store.get(b) is None
        await store.put(b, make_entry(seed=2))
        assert same(await store.get(a), make_entry(seed=1))

    async def test_ttl_expiry(self, store):
        k = key()
        assert await store.put(k, make_entry(tiles=1), ttl_s=1.0)
        assert await store.get(k) is not None
        await asyncio.sleep(1.3)
        assert await store.get(k) is None

    async def test_oversized_entry_is_refused_not_truncated(self, store):
        k = key()
        too_big = make_entry(tiles=1, rows=(store.max_entry_bytes // (16 * 4)) + 1, dim=16)
        assert await store.put(k, too_big) is False
        assert await store.get(k) is None

    async def test_corrupt_tile_is_a_miss(self, store, corrupt):
        k = key()
        await store.put(k, make_entry(tiles=3))
        corrupt(store, k)
        assert await store.get(k) is None

    async def test_truncated_tile_is_a_miss(self, store, corrupt):
        k = key()
        await store.put(k, make_entry(tiles=3))
        corrupt(store, k, truncate=True)
        assert await store.get(k) is None

    async def test_fill_lock_is_exclusive_until_released(self, store):
        k = key()
        token = await store.acquire_fill_lock(k, ttl_s=5.0)
        assert token
        assert await store.acquire_fill_lock(k, ttl_s=5.0) is None
        await store.release_fill_lock(k, "not-the-token")
        assert await store.acquire_fill_lock(k, ttl_s=5.0) is None
        await store.release_fill_lock(k, token)
        assert await store.acquire_fill_lock(k, ttl_s=5.0)

    async def test_fill_lock_expires(self, store):
        k = key()
        assert await store.acquire_fill_lock(k, ttl_s=0.5)
        await asyncio.sleep(0.8)
        assert await store.acquire_fill_lock(k, ttl_s=5.0)

    async def test_concurrent_lock_has_one_winner(self, store):
        k = key()
        tokens = await asyncio.gather(*(store.acquire_fill_lock(k, ttl_s=5.0) for _ in range(16)))
        assert sum(t is not None for t in tokens) == 1
