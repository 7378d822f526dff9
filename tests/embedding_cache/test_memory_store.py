import pytest

from services.embedding_cache.memory import MemoryEmbeddingStore
from tests.embedding_cache.store_conformance import StoreConformance, make_entry


@pytest.fixture
def store():
    return MemoryEmbeddingStore(max_bytes=64 << 20, default_ttl_s=60, max_entry_bytes=8 << 20)


@pytest.fixture
def corrupt():
    def damage(store, key, truncate=False):
        store.corrupt_for_test(key, truncate=truncate)

    return damage


class TestMemoryStoreConformance(StoreConformance):
    pass


async def test_lru_evicts_oldest_by_bytes():
    one = make_entry(tiles=1, rows=256, dim=16)  # 16 KiB
    store = MemoryEmbeddingStore(max_bytes=3 * one.nbytes, default_ttl_s=60)
    for k in "abcd":
        await store.put(k, make_entry(tiles=1, rows=256, dim=16))
    assert await store.get("a") is None
    assert all([await store.get(k) is not None for k in "bcd"])
    assert store.size_bytes == 3 * one.nbytes
