"""Validated configuration of the vision encoder service.

One model per concern (the model, batching, the Redis store, the in-process LRU), composed by
``EncoderConfig``. Built once at the entry point and passed down; library code reads no environment
variables. Every field is bounded so a typo fails at start-up, not under load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.limits import MAX_TILES_PER_IMAGE

MIB = 1024 * 1024

DTYPES = ("auto", "float32", "bfloat16", "float16")
FALLBACKS = ("auto", "object", "inline")


class BatchingConfig(BaseModel):
    """How tiles of concurrent requests are packed into one vision forward."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_tiles: int = Field(
        default=32,
        ge=1,
        le=4096,
        description=(
            "Tile budget of one forward. Bounds activation memory (a 300M InternViT tile is ~1025 tokens); "
            "a larger image is split across forwards so it never holds the device alone."
        ),
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=1000.0,
        description=(
            "How long the first waiting tile may wait for company before a partly filled forward starts. "
            "Short: it is paid by every request that arrives alone."
        ),
    )
    max_queued_tiles: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Tiles waiting at most; beyond it a request is RESOURCE_EXHAUSTED (retry later).",
    )


class RedisStoreConfig(BaseModel):
    """The shared embedding cache in Redis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// URL including the db number; credentials belong in the URL.",
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
        description="While the breaker is open, one operation is let through this often to probe Redis.",
    )


class LruConfig(BaseModel):
    """The in-process first level in front of Redis (and the only cache without Redis)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Keep recent embeddings in process memory.")
    max_bytes: int = Field(default=512 * MIB, ge=1, le=1 << 40, description="Bytes of embeddings kept.")
    ttl_s: float = Field(default=600.0, gt=0.0, le=30 * 24 * 3600.0, description="Lifetime in the LRU.")


class EncoderConfig(BaseModel):
    """Everything the vision encoder needs. ``checkpoint`` is a native InternVL checkpoint directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str = Field(description="Local directory of a transformers-native InternVL checkpoint.")
    revision: str = Field(
        default="", max_length=128, description="Checkpoint revision; part of the cache identity."
    )
    device: str = Field(default="cpu", description="torch device: 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Compute and output dtype. auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU.",
    )
    attention: str = Field(
        default="auto",
        description="Attention backend by name (see services.encoder.attention); auto picks the best available.",
    )
    fallback: Literal["auto", "object", "inline"] = Field(
        default="auto",
        description=(
            "Reference kind when the shared cache cannot hold an embedding (no Redis, Redis down or full): "
            "object = a Ray object reference, inline = the tensor itself, auto = object inside Ray, else inline."
        ),
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    redis: RedisStoreConfig | None = Field(
        default=None, description="The shared cache; None = no shared cache (embedded default)."
    )
    lru: LruConfig = Field(default_factory=LruConfig)
    max_tiles_per_image: int = Field(
        default=MAX_TILES_PER_IMAGE + 1,
        ge=1,
        le=MAX_TILES_PER_IMAGE + 1,
        description="Most tiles accepted for one image: 40 grid tiles (InternVL 1.5) plus the thumbnail.",
    )

    @model_validator(mode="after")
    def _check_device(self) -> EncoderConfig:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        return self
