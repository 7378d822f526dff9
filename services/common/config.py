"""Configuration: one validated model per concern, composed at the top.

Library code receives these objects; only the entry point (the CLI) reads files, flags and the
environment. Every field is documented and bounded, unknown keys are refused (a typo is an error, not a
silently ignored setting), and a bad value produces a message naming the field and what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.errors import InvalidArgument
from services.common.limits import MAX_TILES_PER_IMAGE
from services.common.refs import DEFAULT_KEY_PREFIX, KEY_PREFIX_PATTERN


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RedisConfig(StrictModel):
    """The Redis of the embedding cache (``url``) and the Redis of the gateway's limit counters and usage
    records (``limits_url``). ``url`` empty = no cache Redis; both empty = no Redis at all.

    Eviction is a property of a Redis instance (``maxmemory-policy``), not of a database: a cache wants
    ``allkeys-lru``, counters and records must never be evicted (``noeviction``). So in production the
    limits get a Redis instance of their own; on a laptop ``limits_url`` empty shares the cache's.
    """

    url: str = Field(
        default="",
        description="redis://host:port/db; empty runs without Redis (embeddings travel as Ray objects).",
    )
    password_env: str = Field(
        default="REDIS_PASSWORD",
        description="Name of the environment variable holding the password (never the password itself).",
    )
    limits_url: str = Field(
        default="",
        description=(
            "redis://host:port/db of the Redis holding the rate limiter's counters and the usage stream; "
            "give it maxmemory-policy noeviction. Empty: the cache's url (and password_env), which then "
            "must be noeviction too."
        ),
    )
    limits_password_env: str = Field(
        default="REDIS_LIMITS_PASSWORD",
        description="Name of the environment variable holding the password of limits_url (when set).",
    )
    key_prefix: str = Field(
        default=DEFAULT_KEY_PREFIX,
        pattern=KEY_PREFIX_PATTERN,
        description=(
            "Prefix of every key the mesh writes: the embedding cache's (<prefix>:emb:v1:...), the rate "
            "limiter's (<prefix>:lim:...) and the usage stream (<prefix>:usage by default)."
        ),
    )
    socket_timeout_s: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description=(
            "Bound on one embedding-cache operation (encoder and decoder); past it the request goes on "
            "without the cache. The rate limiter keeps its own, tighter bound."
        ),
    )
    max_connections: int = Field(
        default=64, ge=1, le=4096, description="Connection-pool size of every Redis client of a process."
    )

    @field_validator("url", "limits_url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @property
    def limits_share_cache(self) -> bool:
        """The limits live in the cache's Redis instance: ``limits_url`` empty, or naming the same
        server (host and port, or socket path) as ``url``, whatever the database number."""
        if not self.limits_url or not self.url:
            return bool(self.url) and not self.limits_url
        return redis_instance(self.limits_url) == redis_instance(self.url)


def redis_instance(url: str) -> tuple[str, int | str]:
    """The server a Redis URL names: (host, port), or ("unix", socket path); the db does not count."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return ("unix", parts.path)
    return ((parts.hostname or "localhost").lower(), parts.port or 6379)


class TracingConfig(StrictModel):
    """OpenTelemetry. The exporter endpoint comes from the standard OTEL_* environment variables."""

    enabled: bool = Field(default=True, description="Create spans; export only if an endpoint is set.")
    service_name: str = Field(default="internvl-mesh", min_length=1, max_length=128)
    sampling_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    otlp_endpoint: str = Field(
        default="",
        max_length=512,
        description="OTLP/gRPC collector (host:port or http://host:port); empty: OTEL_EXPORTER_OTLP_ENDPOINT, else none.",
    )
    export_delay_ms: int = Field(default=2000, ge=10, le=60_000, description="Batch export interval.")


class GrpcConfig(StrictModel):
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=4 * 1024 * 1024,
        le=1024 * 1024 * 1024,
        description="Bound on any gRPC message, both directions, on every server and client.",
    )


class ModelConfig(StrictModel):
    """One served model: an encoder + decoder pair under a public name."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/\-]+$")
    path: str = Field(min_length=1, description="Checkpoint directory (native InternVL format) or hub id.")
    dtype: str = Field(
        default="auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."
    )
    device: str = Field(default="auto", description="auto, cpu or cuda.")
    max_tiles_per_image: int = Field(
        default=12, ge=1, le=MAX_TILES_PER_IMAGE, description="Default and cap of max_num (at most 40)."
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError("must be auto, float32, bfloat16 or float16")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in {"auto", "cpu", "cuda"}:
            raise ValueError("must be auto, cpu or cuda")
        return v


class EmbeddingCacheConfig(StrictModel):
    """The embedding cache as seen by the whole mesh (``services.embedding_cache.config`` turns it into
    the encoder's and decoder's store settings)."""

    ttl_s: float = Field(default=24 * 3600, gt=0, le=30 * 24 * 3600, description="Lifetime of an entry.")
    max_entry_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest image embedding (all tiles) written to the shared cache; a larger one is not.",
    )
    local_lru_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        le=1 << 40,
        description="Bytes of the in-process first level of each encoder replica; 0 = off.",
    )


class CommonConfig(StrictModel):
    """What every service shares."""

    redis: RedisConfig = Field(default_factory=RedisConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    cache: EmbeddingCacheConfig = Field(default_factory=EmbeddingCacheConfig)


class ConfigError(InvalidArgument):
    """A configuration file or flag is invalid; the message lists every bad field."""


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {p} must hold a mapping at the top level")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a ``--set a.b.c=value`` override into a nested mapping; a numeric part indexes a list
    (``models.0.dtype=bfloat16``)."""
    keys = dotted.split(".")
    cur: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise ConfigError(f"cannot set {dotted}: {k!r} is not an index of a {len(cur)}-item list")
            if last:
                cur[int(k)] = value
                return
            cur = cur[int(k)]
        elif isinstance(cur, dict):
            if last:
                cur[k] = value
                return
            cur = cur.setdefault(k, {})
        else:
            raise ConfigError(f"cannot set {dotted}: {'.'.join(keys[:depth])} is not a mapping or list")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def build(model_cls: type[BaseModel], data: dict[str, Any], source: str):
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
