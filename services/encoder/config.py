"""Validated configuration of the vision encoder service.

One model per concern (the model, batching; the embedding cache's Redis store and in-process LRU
come from ``services.embedding_cache.config``), composed by ``EncoderConfig``. Built once at the entry point and passed down; library code reads no environment
variables. Every field is bounded so a typo fails at start-up, not under load.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.config import CommonConfig, ModelConfig, StrictModel
from services.common.limits import MAX_TILES_PER_IMAGE
from services.embedding_cache.config import LruConfig, RedisStoreConfig, lru_config, shared_store_config

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
    fair_share: bool = Field(
        default=True,
        description=(
            "Weighted fair share of the tiles between tenants within a priority class (their weights, "
            "per replica); off: priorities, then every waiting request water-filled (the old order)."
        ),
    )
    max_wait_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description=(
            "With fair_share: a request that has waited this long gets tiles above every priority "
            "(the starvation bound of a lower class)."
        ),
    )
    tenant_labels: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None,
        max_length=1000,
        description=(
            "Tenants that get their own label in the per-tenant metrics; the rest are 'other'. "
            "None: the first 64 tenants seen."
        ),
    )


class EncoderSettings(BaseModel):
    """What a mesh config may set for one model's encoder (``models[].encoder_settings``).

    The checkpoint, device and dtype come from the model; ``redis`` and ``lru``, when not set here, from
    the mesh's ``redis`` and ``cache`` sections. Validated when the mesh config is built, so a typo fails
    at ``config render`` with its field path, not when a replica starts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    revision: str = Field(
        default="", max_length=128, description="Checkpoint revision; part of the cache identity."
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
    staged_io: bool = Field(
        default=False,
        description=(
            "Tiles reach the device from a page-locked staging buffer without blocking and embeddings come "
            "back into one (a single wait per batch); a batch is padded to a bucket (1, 2, 4, 8, then every "
            "8 tiles) so the forward sees few shapes. Off until the GPU kit's encoder stage passes with it on."
        ),
    )
    max_tiles_per_image: int = Field(
        default=MAX_TILES_PER_IMAGE + 1,
        ge=1,
        le=MAX_TILES_PER_IMAGE + 1,
        description="Most tiles accepted for one image: 40 grid tiles (InternVL 1.5) plus the thumbnail.",
    )


class EncoderConfig(EncoderSettings):
    """Everything the vision encoder needs. ``checkpoint`` is a native InternVL checkpoint directory."""

    checkpoint: str = Field(description="Local directory of a transformers-native InternVL checkpoint.")
    device: str = Field(default="cpu", description="torch device: 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Compute and output dtype. auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU.",
    )

    @model_validator(mode="after")
    def _check_device(self) -> EncoderConfig:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        return self


class EncoderAppArgs(StrictModel):
    """The args of an encoder's Serve application (``services.encoder.deployment:build_app``)."""

    model: ModelConfig
    settings: EncoderSettings = Field(default_factory=EncoderSettings)
    common: CommonConfig = Field(default_factory=CommonConfig)
    preprocess_app: str | None = Field(
        default="preprocess", description="The preprocess application that tiles misses; None: in process."
    )
    deployment_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options (resources, scaling)."
    )

    def encoder_config(self, device: str, redis_url: str) -> EncoderConfig:
        """The config a replica on ``device`` builds from these args, with ``redis_url`` (the password
        filled in) for the shared cache. The support check builds the same."""
        return EncoderConfig.model_validate(
            {
                "checkpoint": self.model.path,
                "device": device,
                "dtype": self.model.dtype,
                "fallback": "auto",
                "max_tiles_per_image": self.model.max_tiles_per_image + 1,
                "redis": shared_store_config(self.common, redis_url),
                "lru": lru_config(self.common.cache),
                **self.settings.model_dump(exclude_unset=True),  # what the model's settings say wins
            }
        )
