"""The Redis store against the shared conformance suite, on the real server (the suite's db)."""

from __future__ import annotations

import json

import pytest

from services.embedding_cache.config import RedisStoreConfig
from services.embedding_cache.redis_store import RedisEmbeddingStore, tile_key
from tests.embedding_cache.helpers import REDIS_URL
from tests.embedding_cache.store_conformance import StoreConformance, key, make_entry


@pytest.fixture
async def store(sync_redis):
    s = RedisEmbeddingStore(RedisStoreConfig(url=REDIS_URL, ttl_s=120, max_entry_bytes=8 << 20))
    yield s
    await s.close()


@pytest.fixture
def corrupt(sync_redis):
    def damage(store, k, truncate=False):
        manifest = sync_redis.get(k)
        assert manifest is not None
        last = tile_key(k, json.loads(manifest)["tiles"] - 1)
        blob = sync_redis.get(last)
        sync_redis.set(last, blob[:-1] if truncate else bytes([blob[0] ^ 0xFF]) + blob[1:], keepttl=True)

    return damage


class TestRedisStoreConformance(StoreConformance):
    pass


async def test_entry_is_one_value_per_tile_with_ttl(store, sync_redis):
    k, entry = key(), make_entry(tiles=4, dim=32)
    assert await store.put(k, entry, ttl_s=30)
    for i in range(4):
        assert sync_redis.get(tile_key(k, i)) == bytes(entry.tiles[i].data)
        assert 0 < sync_redis.pttl(tile_key(k, i)) <= 30_000
    assert 0 < sync_redis.pttl(k) <= 30_000


async def test_missing_tile_is_a_miss(store, sync_redis):
    k = key()
    await store.put(k, make_entry(tiles=3))
    sync_redis.delete(tile_key(k, 1))  # as an eviction of one tile would
    assert await store.get(k) is None
    assert not await store.contains(k)


async def test_unreadable_manifest_is_a_miss(store, sync_redis):
    k = key()
    await store.put(k, make_entry(tiles=2))
    sync_redis.set(k, b"{not json", keepttl=True)
    assert await store.get(k) is None


async def test_delete_removes_tiles(store, sync_redis):
    k = key()
    await store.put(k, make_entry(tiles=3))
    await store.delete(k)
    assert sync_redis.exists(k, *(tile_key(k, i) for i in range(3))) == 0
