"""Embedding references and the cache-key derivation.

The encoder never hands embedding bytes to the gateway: it returns references, and the decoder
resolves them. A reference is one of three kinds, and every consumer accepts all three:

- ``cache``: a key in the embedding store (Redis in production): one value per tile plus a manifest;
- ``object``: a Ray object reference (the embedded default without Redis, and the fallback while Redis
  is down); the gateway passes it from encoder to decoder through handles without reading it;
- ``inline``: the tensor itself (standalone gRPC use).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.errors import InvalidArgument
from services.common.tensors import WireTensor
from services.common.types import TilingParams

KIND_CACHE = "cache"
KIND_OBJECT = "object"
KIND_INLINE = "inline"
KINDS = (KIND_CACHE, KIND_OBJECT, KIND_INLINE)

DEFAULT_KEY_PREFIX = "ivm"
KEY_PREFIX_PATTERN = r"^[A-Za-z0-9_.\-]{1,32}$"
_KEY_PREFIX_RE = re.compile(KEY_PREFIX_PATTERN)
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_NAMESPACE = "default"


def validate_namespace(namespace: str) -> str:
    if not _NAMESPACE_RE.fullmatch(namespace or ""):
        raise InvalidArgument(
            f"cache namespace {namespace!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return namespace


def encoder_identity(checkpoint_identity: str, dtype: str, revision: str = "") -> str:
    """Names the weights and numerics that produced an embedding: checkpoint + revision + dtype."""
    return f"{checkpoint_identity}|{revision}|{dtype}"


def embedding_key(
    namespace: str,
    encoder_id: str,
    tiling: TilingParams,
    image_sha256: str,
    prefix: str = DEFAULT_KEY_PREFIX,
) -> str:
    """The content address of one image's embeddings: ``<prefix>:emb:v1:<namespace>:...``.

    Same bytes, same encoder (weights + dtype), same tiling parameters and same namespace give the same
    key; change any of them and the key changes. The namespace comes first (after the deployment's
    ``prefix``) so a tenant's entries can be listed or dropped by prefix, and so that no two tenants
    ever share a key unless configured to.
    """
    if not _KEY_PREFIX_RE.fullmatch(prefix):
        raise InvalidArgument(
            f"key prefix {prefix!r} must be 1-32 characters of letters, digits, '_', '.', '-'"
        )
    validate_namespace(namespace)
    if not _SHA256_RE.fullmatch(image_sha256):
        raise InvalidArgument("image_sha256 must be 64 lowercase hex characters")
    enc = hashlib.sha256(encoder_id.encode()).hexdigest()[:16]
    return f"{prefix}:emb:v1:{namespace}:{enc}:{tiling.cache_token()}:{image_sha256}"


def key_namespace(key: str) -> str | None:
    """The namespace of a key made by :func:`embedding_key`, or None for anything else."""
    parts = key.split(":")
    if len(parts) != 7 or parts[1:3] != ["emb", "v1"]:
        return None
    return parts[3] if _NAMESPACE_RE.fullmatch(parts[3]) else None


@dataclass(frozen=True)
class EmbeddingRef:
    """Where one image's embeddings are, and what they look like: (tokens, dim) rows, tile by tile."""

    kind: str
    key: str
    image_sha256: str
    tiles: int
    tokens_per_tile: int
    dim: int
    dtype: str
    grid: tuple[int, int] = (1, 1)
    cache_hit: bool = False
    frames: int = 1  # a video's sampled frames; its tiles are theirs, frame by frame
    object_ref: Any = field(default=None, compare=False, repr=False)
    tensor: WireTensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgument(f"embedding reference kind must be one of {KINDS}, got {self.kind!r}")
        if self.tiles < 1 or self.tokens_per_tile < 1 or self.dim < 1:
            raise InvalidArgument("embedding reference needs tiles, tokens_per_tile and dim >= 1")
        if self.frames < 1 or self.tiles % self.frames:
            raise InvalidArgument(f"{self.tiles} tiles cannot be {self.frames} frames of equal tiles")
        if self.kind == KIND_INLINE:
            if self.tensor is None:
                raise InvalidArgument("an inline embedding reference carries its tensor")
            if tuple(self.tensor.shape) != self.shape:
                raise InvalidArgument(
                    f"inline embedding shape {tuple(self.tensor.shape)} does not match {self.shape}"
                )
        if self.kind == KIND_CACHE and not self.key:
            raise InvalidArgument("a cache embedding reference needs its key")

    @property
    def tokens(self) -> int:
        return self.tiles * self.tokens_per_tile

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.dim)

    def with_kind(self, kind: str, **changes: Any) -> EmbeddingRef:
        return replace(self, kind=kind, **changes)
