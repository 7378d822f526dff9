import pytest
import torch

from services.common.errors import EmbeddingUnresolvable
from services.common.refs import KIND_CACHE, KIND_INLINE, EmbeddingRef, embedding_key
from services.common.tensors import WireTensor
from services.common.types import TilingParams, sha256_hex
from services.embedding_cache.memory import MemoryEmbeddingStore
from services.embedding_cache.resolver import EmbeddingResolver
from services.embedding_cache.store import StoredEmbedding

H = sha256_hex(b"img")
NS = "tenant-a"
KEY = embedding_key(NS, "enc", TilingParams(), H)


def _ref(kind, tensor=None, key=KEY, tiles=2):
    return EmbeddingRef(
        kind, key, H, tiles=tiles, tokens_per_tile=256, dim=8, dtype="bfloat16", tensor=tensor
    )


async def test_inline_and_cache_resolve_to_the_same_tensor():
    t = WireTensor.from_torch(torch.randn(512, 8).to(torch.bfloat16))
    store = MemoryEmbeddingStore()
    await store.put(KEY, StoredEmbedding.from_tensor(t, tiles=2))
    resolver = EmbeddingResolver(store)
    a = await resolver.resolve(_ref(KIND_INLINE, tensor=t, key=""), NS)
    b = await resolver.resolve(_ref(KIND_CACHE), NS)
    assert bytes(a.data) == bytes(b.data) == bytes(t.data)
    assert torch.equal(b.to_torch(), t.to_torch())


async def test_evicted_entry_is_unresolvable():
    with pytest.raises(EmbeddingUnresolvable):
        await EmbeddingResolver(MemoryEmbeddingStore()).resolve(_ref(KIND_CACHE), NS)
    with pytest.raises(EmbeddingUnresolvable):
        await EmbeddingResolver(None).resolve(_ref(KIND_CACHE), NS)


async def test_every_cache_failure_is_the_same_error():
    """Another namespace's key, a missing key, a key that is not an embedding, an entry of another shape:
    one error, one message, so a caller learns nothing about which keys exist."""
    t = WireTensor.from_torch(torch.randn(512, 8).to(torch.bfloat16))
    store = MemoryEmbeddingStore()
    await store.put(KEY, StoredEmbedding.from_tensor(t, tiles=2))
    resolver = EmbeddingResolver(store)
    other = embedding_key("tenant-b", "enc", TilingParams(), H)
    cases = {
        "another namespace's key, as the caller": (_ref(KIND_CACHE), "tenant-b"),
        "another namespace's key, named": (_ref(KIND_CACHE, key=KEY), "tenant-b"),
        "a key of the caller's namespace that is not there": (_ref(KIND_CACHE, key=other), "tenant-b"),
        "not an embedding key": (_ref(KIND_CACHE, key="ivm:lim:tenant-a"), NS),
        "an entry of another shape": (_ref(KIND_CACHE, tiles=1), NS),
    }
    messages = set()
    for name, (ref, namespace) in cases.items():
        with pytest.raises(EmbeddingUnresolvable) as err:
            await resolver.resolve(ref, namespace)
        messages.add((err.value.message, err.value.reason))
        assert err.value.reason == "embedding_unresolvable", name
    assert len(messages) == 1
