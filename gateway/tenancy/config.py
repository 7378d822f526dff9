"""The tenants file: tenants, their limits, and the digests of their API keys.

The file is YAML, validated strictly (unknown keys are errors: a misspelt limit must not silently
become "unlimited")::

    hmac_secret_env: IVM_KEY_HMAC_SECRET   # optional; without it digests are plain SHA-256
    tenants:
      - name: acme
        allowed_models: ["internvl2-8b"]   # or ["*"]
        priority: 2
        weight: 3                          # fair share of the decoder within its priority class
        max_kv_share: 0.5                  # at most half the decoder's KV blocks
        limits: {requests_per_s: 20, tokens_per_min: 400000, max_concurrent: 32}
    keys:
      - {key_id: k1a2b3, tenant: acme, digest: "<64 hex>", created_at: 2025-01-01T00:00:00Z}

Only digests are stored, never keys: a leaked file (or a leaked Kubernetes secret) does not hand out
working keys. With ``hmac_secret_env`` set the digest is an HMAC-SHA256 under a secret that lives
elsewhere (an environment variable the entry point reads), so a leaked file is not even a dictionary
for offline guessing.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.errors import InvalidArgument, PermissionDenied
from services.common.limits import (
    MAX_FRAMES_PER_REQUEST,
    MAX_GRAMMAR_COMPILE_MS,
    MAX_IMAGES_PER_REQUEST,
    MAX_N,
    MAX_PRIORITY,
    MAX_SCHEMA_BYTES,
    MAX_TILES_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
    MAX_WEIGHT,
    MIN_WEIGHT,
    check_n,
)

if TYPE_CHECKING:
    from services.decoder.engine.response_format import ResponseFormat

TENANT_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
# No '-' in a key id: keys are ``ivm-<key_id>-<secret>`` and the id is what lies between the dashes.
KEY_ID_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
ALL_MODELS = "*"

# What a key may call: the public chat API (HTTP and gRPC ``GatewayService``), and the internal
# services through the gateway's gRPC port (``PreprocessService/TileImages``,
# ``EncoderService/EmbedImages``, ``DecoderService/Generate`` and ``/CountTokens``).
Scope = Literal["chat", "tile", "embed", "decode"]
SCOPES: tuple[str, ...] = get_args(Scope)
SCOPE_CHAT, SCOPE_TILE, SCOPE_EMBED, SCOPE_DECODE = SCOPES

# Upper bounds of every limit. They double as the single-tenant defaults (see ``TenantLimits.generous``).
# The per-request caps are the mesh's own bounds (``services.common.limits``): no tenant gets more.
MAX_REQUESTS_PER_S = 100_000.0
MAX_BURST = 1_000_000
MAX_TOKENS_PER_MIN = 10_000_000_000
MAX_CONCURRENT = 100_000
MAX_DAILY_TOKENS = 10_000_000_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantLimits(_Strict):
    """What one tenant may use. Rates are shared by every gateway replica (counters live in Redis)."""

    requests_per_s: float = Field(
        default=10.0,
        gt=0,
        le=MAX_REQUESTS_PER_S,
        description="Sustained admissions per second (a token bucket refilled at this rate).",
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BURST,
        description="Requests admitted back to back after a quiet period; default: 2 x requests_per_s.",
    )
    tokens_per_min: int = Field(
        default=200_000,
        ge=1,
        le=MAX_TOKENS_PER_MIN,
        description="Prompt + completion tokens per minute; prompt + max_tokens is reserved at admission.",
    )
    max_concurrent: int = Field(
        default=16, ge=1, le=MAX_CONCURRENT, description="Requests in flight at once, over all replicas."
    )
    daily_token_quota: int = Field(
        default=10_000_000,
        ge=1,
        le=MAX_DAILY_TOKENS,
        description="Prompt + completion tokens per UTC day; reserved at admission like tokens_per_min.",
    )
    max_tiles_per_request: int = Field(
        default=48,
        ge=1,
        le=MAX_TILES_PER_REQUEST,
        description="Image tiles (448x448 crops, thumbnails included) in one request; at most 128.",
    )
    max_images_per_request: int = Field(
        default=8,
        ge=1,
        le=MAX_IMAGES_PER_REQUEST,
        description="Images and videos in one request; at most 16.",
    )
    max_frames_per_request: int = Field(
        default=32,
        ge=1,
        le=MAX_FRAMES_PER_REQUEST,
        description=(
            "Video frames sampled in one request, all videos together (each video's num_frames, 8 by "
            "default); at most 128. Every frame is at least one tile of max_tiles_per_request too."
        ),
    )
    max_tokens_per_request: int = Field(
        default=4096,
        ge=1,
        le=MAX_TOKENS_PER_REQUEST,
        description="Cap of a request's max_tokens (the model's context caps it too).",
    )
    max_schema_bytes: int = Field(
        default=32 * 1024,
        ge=1,
        le=MAX_SCHEMA_BYTES,
        description="Largest response_format JSON schema, in bytes as compact JSON; at most 256 KiB.",
    )
    max_grammar_compile_ms: int = Field(
        default=1000,
        ge=1,
        le=MAX_GRAMMAR_COMPILE_MS,
        description="Longest a request's JSON schema may take to compile (waiting included); at most 10 s.",
    )
    max_n: int = Field(
        default=8,
        ge=1,
        le=MAX_N,
        description=(
            "Most choices (n) in one request; at most 16. Each choice is a sequence in the decoder's batch "
            "and n x max_tokens completion tokens are reserved at admission."
        ),
    )

    @property
    def bucket_size(self) -> int:
        """Capacity of the requests/s bucket: ``burst``, or twice the rate (at least 1)."""
        if self.burst is not None:
            return self.burst
        return max(1, min(MAX_BURST, math.ceil(2 * self.requests_per_s)))

    @classmethod
    def generous(cls) -> TenantLimits:
        """The single-tenant default: every field at its bound, so rates no deployment reaches and the
        mesh's own per-request bounds (16 images, 128 tiles)."""
        return cls(
            requests_per_s=MAX_REQUESTS_PER_S,
            burst=MAX_BURST,
            tokens_per_min=MAX_TOKENS_PER_MIN,
            max_concurrent=MAX_CONCURRENT,
            daily_token_quota=MAX_DAILY_TOKENS,
            max_tiles_per_request=MAX_TILES_PER_REQUEST,
            max_images_per_request=MAX_IMAGES_PER_REQUEST,
            max_frames_per_request=MAX_FRAMES_PER_REQUEST,
            max_tokens_per_request=MAX_TOKENS_PER_REQUEST,
            max_schema_bytes=MAX_SCHEMA_BYTES,
            max_grammar_compile_ms=MAX_GRAMMAR_COMPILE_MS,
            max_n=MAX_N,
        )


class Tenant(_Strict):
    """A customer of the gateway: who may use which models, how much, and how urgently."""

    name: str = Field(pattern=TENANT_NAME_PATTERN, description="Unique; appears in logs and metrics.")
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: [ALL_MODELS],
        min_length=1,
        max_length=1000,
        description='Public model names this tenant may call; ["*"] = every served model.',
    )
    limits: TenantLimits = Field(default_factory=TenantLimits)
    priority: int = Field(
        default=0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description="Passed to the decoder's scheduler and the encoder's batching; higher runs first.",
    )
    weight: float = Field(
        default=1.0,
        ge=MIN_WEIGHT,
        le=MAX_WEIGHT,
        allow_inf_nan=False,
        description=(
            "Fair share of the decoder within a priority class: busy tenants of one class get tokens "
            "computed in proportion to their weights. Signed into the request context."
        ),
    )
    max_kv_share: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Fraction of each decoder's KV blocks this tenant's running requests may hold at most; "
            "None: no cap beyond the fair share. Signed into the request context."
        ),
    )
    cache_namespace: str | None = Field(
        default=None,
        pattern=TENANT_NAME_PATTERN,
        description=(
            "Embedding-cache namespace; default: the tenant's name, so tenants never share hits (a hit "
            "is a timing side channel). Give two tenants the same value to opt into a shared cache."
        ),
    )

    @model_validator(mode="after")
    def _default_namespace(self) -> Tenant:
        if self.cache_namespace is None:
            object.__setattr__(self, "cache_namespace", self.name)
        return self

    def allows_model(self, model: str) -> bool:
        return ALL_MODELS in self.allowed_models or model in self.allowed_models

    def check_model(self, model: str) -> None:
        """PermissionDenied if this tenant may not call ``model`` (its key is fine, its plan is not)."""
        if not self.allows_model(model):
            raise PermissionDenied(
                f"tenant {self.name!r} may not use model {model!r}", reason="model_not_allowed"
            )

    def check_request_size(self, *, images: int = 0, tiles: int = 0, frames: int = 0) -> None:
        """InvalidArgument if one request carries more images (videos included), tiles or video frames
        than this tenant's caps (never above the mesh's bounds): retrying it unchanged cannot succeed."""
        lim = self.limits
        if frames > lim.max_frames_per_request:
            raise InvalidArgument(
                f"the videos ask for {frames} frames, over the limit of {lim.max_frames_per_request} per "
                "request; lower num_frames",
                reason="too_many_frames",
            )
        if images > lim.max_images_per_request:
            raise InvalidArgument(
                f"{images} images, over the limit of {lim.max_images_per_request} per request",
                reason="too_many_images",
            )
        if tiles > lim.max_tiles_per_request:
            raise InvalidArgument(
                f"the images would take {tiles} tiles, over the limit of {lim.max_tiles_per_request} per "
                "request; lower max_num or send fewer images",
                reason="too_many_tiles",
            )

    def bound_response_format(self, fmt: ResponseFormat | None) -> ResponseFormat | None:
        """``fmt`` within this tenant's limits: InvalidArgument (``response_format_too_large``) for a
        schema over ``max_schema_bytes``; its compile budget at most ``max_grammar_compile_ms``."""
        if fmt is None:
            return None
        fmt.check_size(self.limits.max_schema_bytes)
        cap = self.limits.max_grammar_compile_ms
        return replace(fmt, max_compile_ms=min(fmt.max_compile_ms or cap, cap))

    def check_n(self, n: int) -> None:
        """InvalidArgument (``n_out_of_range``) unless ``n`` choices lie in 1..``max_n``."""
        check_n(n, self.limits.max_n)

    def max_tokens(self, requested: int | None, *, context: int, default: int) -> int:
        """The ``max_tokens`` a request runs with: ``requested`` if in 1..cap, else InvalidArgument;
        ``default`` when it asks for none. The cap is this tenant's ``max_tokens_per_request`` and the
        model's ``context``, whichever is lower."""
        cap = min(self.limits.max_tokens_per_request, context)
        if requested is None:
            return min(default, cap)
        if not 1 <= requested <= cap:
            raise InvalidArgument(
                f"max_tokens must be in 1..{cap}, got {requested}", reason="max_tokens_out_of_range"
            )
        return requested


class ApiKeyEntry(_Strict):
    """One stored key: its digest and who it belongs to, never the key itself."""

    key_id: str = Field(
        pattern=KEY_ID_PATTERN, description="Public part of the key (ivm-<key_id>-<secret>); safe to log."
    )
    tenant: str = Field(pattern=TENANT_NAME_PATTERN, description="Name of the tenant the key acts for.")
    digest: str = Field(
        pattern=DIGEST_PATTERN, description="Hex HMAC-SHA256 (or SHA-256) of the whole key string."
    )
    created_at: datetime = Field(description="When the key was made (UTC); informational.")
    expires_at: datetime | None = Field(
        default=None, description="The key stops working at this instant (UTC); none = never."
    )
    revoked: bool = Field(default=False, description="True stops the key on the next reload.")
    scopes: list[Scope] = Field(
        default_factory=lambda: [SCOPE_CHAT],
        min_length=1,
        max_length=len(SCOPES),
        description=(
            "What the key may call: chat (the public chat API), tile, embed, decode (the internal "
            "preprocess, encoder and decoder APIs through the gateway); default: chat only."
        ),
    )

    @field_validator("scopes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        _refuse_duplicates(v, "scope")
        return v

    @field_validator("created_at", "expires_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        # A timestamp without a zone is read as UTC, so comparisons never mix naive and aware values.
        if v is not None and v.tzinfo is None:
            return v.replace(tzinfo=UTC)
        return v

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class TenantsFile(_Strict):
    """The whole file. Cross-references are checked: every key names an existing tenant."""

    hmac_secret_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable holding the HMAC secret (never the secret itself).",
    )
    tenants: list[Tenant] = Field(default_factory=list, max_length=100_000)
    keys: list[ApiKeyEntry] = Field(default_factory=list, max_length=1_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> TenantsFile:
        names = [t.name for t in self.tenants]
        _refuse_duplicates(names, "tenant name")
        _refuse_duplicates([k.key_id for k in self.keys], "key_id")
        _refuse_duplicates([k.digest for k in self.keys], "key digest")
        known = set(names)
        for k in self.keys:
            if k.tenant not in known:
                raise ValueError(f"key {k.key_id!r} names tenant {k.tenant!r}, which is not in tenants")
        return self


def _refuse_duplicates(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate {what} {v!r}: each must be unique")
        seen.add(v)


def parse_key_id(api_key: str) -> str | None:
    """The key id of an ``ivm-<key_id>-<secret>`` key, or None for any other shape (safe to log)."""
    parts = api_key.split("-", 2)
    if len(parts) != 3 or parts[0] != "ivm" or not parts[2]:
        return None
    return parts[1] if re.fullmatch(KEY_ID_PATTERN, parts[1]) else None
