"""Turning an embedding reference into the tensor it names, for any of the three kinds.

The decoder resolves references; nothing else reads embedding bytes. A reference that can no longer
be read (evicted cache entry, Ray object whose owner died) raises ``EmbeddingUnresolvable``, which the
gateway answers by encoding the image again, once.

References cannot cross tenants: a ``cache`` or ``object`` reference resolves only when its key lies in
the namespace of the verified request context, and every way a ``cache`` reference can fail (another
namespace, no such key, a key that is not an embedding, a store error) gives the caller the same error,
so nothing tells whether a key exists. The details go to the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from services.common.errors import EmbeddingUnresolvable, InvalidArgument, MeshError
from services.common.refs import KIND_CACHE, KIND_INLINE, KIND_OBJECT, EmbeddingRef, key_namespace
from services.common.tensors import WireTensor
from services.embedding_cache.store import EmbeddingStore

log = logging.getLogger(__name__)
UNRESOLVABLE = "an embedding reference cannot be resolved; embed the image again"


class EmbeddingResolver:
    def __init__(self, store: EmbeddingStore | None = None, object_timeout_s: float = 30.0):
        self.store = store
        self.object_timeout_s = object_timeout_s

    async def resolve(self, ref: EmbeddingRef, namespace: str) -> WireTensor:
        """The (tokens, dim) tensor of one reference, checked against the reference's shape;
        ``namespace`` is the verified context's."""
        if ref.kind == KIND_INLINE:
            tensor = ref.tensor
        elif ref.kind == KIND_CACHE:
            tensor = await self._from_cache(ref, namespace)
        elif ref.kind == KIND_OBJECT:
            if ref.key and key_namespace(ref.key) != namespace:
                raise EmbeddingUnresolvable(UNRESOLVABLE)
            tensor = await self._from_object(ref.object_ref, ref.dtype)
        else:  # pragma: no cover - EmbeddingRef validates its kind
            raise InvalidArgument(f"unknown embedding reference kind {ref.kind!r}")
        if tensor is None or tuple(tensor.shape) != ref.shape or tensor.dtype != ref.dtype:
            got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
            raise InvalidArgument(
                f"embedding for {ref.image_sha256[:12]} is {got}, reference says {ref.shape} {ref.dtype}"
            )
        return tensor

    async def _from_cache(self, ref: EmbeddingRef, namespace: str) -> WireTensor:
        """A cache entry of ``namespace``; one error for every failure."""
        why = ""
        if key_namespace(ref.key) != namespace:
            why = "outside the caller's namespace"
        elif self.store is None:
            why = "no embedding store is configured"
        else:
            try:
                entry = await self.store.get(ref.key)
            except MeshError as exc:  # the store is down, or the key holds something else
                entry, why = None, exc.message
            if entry is not None:
                tensor = entry.concat()
                if tuple(tensor.shape) == ref.shape and tensor.dtype == ref.dtype:
                    return tensor
                why = f"the entry is {tuple(tensor.shape)} {tensor.dtype}"
            why = why or "not in the cache"
        log.info("cache reference unresolvable (%s): %s", why, ref.key[:200])
        raise EmbeddingUnresolvable(UNRESOLVABLE)

    async def resolve_all(self, refs: list[EmbeddingRef], namespace: str) -> list[WireTensor]:
        return list(await asyncio.gather(*(self.resolve(r, namespace) for r in refs)))

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
