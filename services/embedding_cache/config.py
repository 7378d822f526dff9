"""Configuration of the embedding cache: the shared store in Redis and the in-process LRU.

``shared_store_config`` and ``lru_config`` turn the mesh-level settings (``redis`` and ``cache`` of
``services.common.config.CommonConfig``) into these models; encoder and decoder replicas build their
stores from them, and a model's own encoder settings may still replace either one whole.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.common.config import CommonConfig, EmbeddingCacheConfig
from services.common.refs import DEFAULT_KEY_PREFIX, KEY_PREFIX_PATTERN

MIB = 1024 * 1024


class RedisStoreConfig(BaseModel):
    """The shared embedding cache in Redis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// URL including the db number; credentials belong in the URL.",
    )
    key_prefix: str = Field(
        default=DEFAULT_KEY_PREFIX,
        pattern=KEY_PREFIX_PATTERN,
        description="Keys of this cache are <key_prefix>:emb:v1:<namespace>:...; the default is the mesh's layout.",
    )
    max_connections: int = Field(default=32, ge=1, le=4096, description="Connection-pool size.")
    op_timeout_s: float = Field(
        default=0.5,
        gt=0.0,
        le=60.0,
        description=(
            "Bound on one store operation (a whole pipelined read or write). Past it the operation counts "
            "as a failure and the request is answered without the cache."
        ),
    )
    connect_timeout_s: float = Field(default=0.5, gt=0.0, le=60.0, description="TCP connect timeout.")
    ttl_s: float = Field(
        default=24 * 3600.0, gt=0.0, le=30 * 24 * 3600.0, description="Lifetime of a cached embedding."
    )
    max_entry_bytes: int = Field(
        default=256 * MIB,
        ge=1,
        le=1024 * MIB,
        description="Largest image embedding stored (all tiles); a larger one is not cached.",
    )
    lock_ttl_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description=(
            "Lifetime of the cross-replica fill lock: at most this long do other replicas wait for the "
            "replica encoding an image before encoding it themselves."
        ),
    )
    lock_poll_s: float = Field(
        default=0.02, gt=0.0, le=5.0, description="How often a replica waiting on another's fill polls."
    )
    failure_threshold: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Consecutive failed operations that open the circuit breaker (Redis is skipped).",
    )
    reprobe_interval_s: float = Field(
        default=1.0,
        gt=0.0,
        le=300.0,
        description=(
            "While the breaker is open, one operation probes Redis this long after the last failure "
            "(one at a time; the others answer without the cache)."
        ),
    )


class LruConfig(BaseModel):
    """The in-process first level in front of Redis (and the only cache without Redis)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Keep recent embeddings in process memory.")
    max_bytes: int = Field(default=512 * MIB, ge=1, le=1 << 40, description="Bytes of embeddings kept.")
    ttl_s: float = Field(default=600.0, gt=0.0, le=30 * 24 * 3600.0, description="Lifetime in the LRU.")


def shared_store_config(common: CommonConfig, url: str) -> RedisStoreConfig | None:
    """The shared store as the mesh-level settings describe it; None without a Redis URL."""
    if not url:
        return None
    return RedisStoreConfig(
        url=url,
        key_prefix=common.redis.key_prefix,
        max_connections=common.redis.max_connections,
        op_timeout_s=common.redis.socket_timeout_s,
        ttl_s=common.cache.ttl_s,
        max_entry_bytes=common.cache.max_entry_bytes,
    )


def lru_config(cache: EmbeddingCacheConfig) -> LruConfig:
    """The in-process LRU of ``cache.local_lru_bytes`` (0: none)."""
    if cache.local_lru_bytes == 0:
        return LruConfig(enabled=False)
    return LruConfig(max_bytes=cache.local_lru_bytes)
