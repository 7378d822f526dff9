"""Turning an embedding reference into the tensor it names, for any of the three kinds.

The decoder resolves references; nothing else reads embedding bytes. A reference that can no longer
be read (evicted cache entry, Ray object whose owner died) raises ``EmbeddingUnresolvable``, which the
gateway answers by encoding the image again, once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from services.common.errors import EmbeddingUnresolvable, InvalidArgument, Unavailable
from services.common.refs import KIND_CACHE, KIND_INLINE, KIND_OBJECT, EmbeddingRef
from services.common.tensors import WireTensor
from services.embedding_cache.store import EmbeddingStore


class EmbeddingResolver:
    def __init__(self, store: EmbeddingStore | None = None, object_timeout_s: float = 30.0):
        self.store = store
        self.object_timeout_s = object_timeout_s

    async def resolve(self, ref: EmbeddingRef) -> WireTensor:
        """The (tokens, dim) tensor of one reference, checked against the reference's shape."""
        if ref.kind == KIND_INLINE:
            tensor = ref.tensor
        elif ref.kind == KIND_CACHE:
            if self.store is None:
                raise EmbeddingUnresolvable(f"no embedding store is configured to read {ref.key}")
            try:
                entry = await self.store.get(ref.key)
            except Unavailable as exc:  # the store went down between encode and decode
                raise EmbeddingUnresolvable(f"cannot read embedding {ref.key}: {exc.message}") from exc
            if entry is None:
                raise EmbeddingUnresolvable(f"embedding {ref.key} is no longer in the cache")
            tensor = entry.concat()
        elif ref.kind == KIND_OBJECT:
            tensor = await self._from_object(ref.object_ref, ref.dtype)
        else:  # pragma: no cover - EmbeddingRef validates its kind
            raise InvalidArgument(f"unknown embedding reference kind {ref.kind!r}")
        if tensor is None or tuple(tensor.shape) != ref.shape or tensor.dtype != ref.dtype:
            got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
            raise InvalidArgument(
                f"embedding for {ref.image_sha256[:12]} is {got}, reference says {ref.shape} {ref.dtype}"
            )
        return tensor

    async def resolve_all(self, refs: list[EmbeddingRef]) -> list[WireTensor]:
        return list(await asyncio.gather(*(self.resolve(r) for r in refs)))

    async def _from_object(self, object_ref: Any, dtype: str) -> WireTensor:
        if object_ref is None:
            raise InvalidArgument("an object embedding reference carries its ObjectRef")
        from ray.exceptions import ObjectLostError, OwnerDiedError, RayError

        try:
            value = await asyncio.wait_for(object_ref, timeout=self.object_timeout_s)
        except (OwnerDiedError, ObjectLostError) as exc:
            raise EmbeddingUnresolvable(f"the Ray object holding the embedding is gone: {exc}") from exc
        except (RayError, TimeoutError) as exc:
            raise EmbeddingUnresolvable(f"cannot read the embedding object: {exc}") from exc
        if isinstance(value, WireTensor):
            return value
        if isinstance(value, np.ndarray):  # bf16 travels as its uint16 bit patterns
            return WireTensor.from_numpy(value, dtype=dtype)
        raise InvalidArgument(f"embedding object holds {type(value).__name__}, expected an array")
