import pytest
import torch

from services.common.errors import EmbeddingUnresolvable, InvalidArgument
from services.common.refs import KIND_CACHE, KIND_INLINE, EmbeddingRef
from services.common.tensors import WireTensor
from services.common.types import sha256_hex
from services.embedding_cache.memory import MemoryEmbeddingStore
from services.embedding_cache.resolver import EmbeddingResolver
from services.embedding_cache.store import StoredEmbedding

H = sha256_hex(b"img")


def _ref(kind, tensor=None, key="k", tiles=2):
    return EmbeddingRef(
        kind, key, H, tiles=tiles, tokens_per_tile=256, dim=8, dtype="bfloat16", tensor=tensor
    )


async def test_inline_and_cache_resolve_to_the_same_tensor():
    t = WireTensor.from_torch(torch.randn(512, 8).to(torch.bfloat16))
    store = MemoryEmbeddingStore()
    await store.put("k", StoredEmbedding.from_tensor(t, tiles=2))
    resolver = EmbeddingResolver(store)
    a = await resolver.resolve(_ref(KIND_INLINE, tensor=t, key=""))
    b = await resolver.resolve(_ref(KIND_CACHE))
    assert bytes(a.data) == bytes(b.data) == bytes(t.data)
    assert torch.equal(b.to_torch(), t.to_torch())


async def test_evicted_entry_is_unresolvable():
    with pytest.raises(EmbeddingUnresolvable):
        await EmbeddingResolver(MemoryEmbeddingStore()).resolve(_ref(KIND_CACHE, key="gone"))
    with pytest.raises(EmbeddingUnresolvable):
        await EmbeddingResolver(None).resolve(_ref(KIND_CACHE))


async def test_shape_mismatch_between_entry_and_reference_is_rejected():
    t = WireTensor.from_torch(torch.randn(512, 8).to(torch.bfloat16))
    store = MemoryEmbeddingStore()
    await store.put("k", StoredEmbedding.from_tensor(t, tiles=2))
    with pytest.raises(InvalidArgument):
        await EmbeddingResolver(store).resolve(_ref(KIND_CACHE, tiles=1))
