"""Settings for operating a multi-tenant gateway: usage records, the audit log, tenant metric labels, TLS.

One validated model per concern, composed in ``OpsSettings`` (nested into the gateway's settings as
``ops``). Nothing here reads the environment: paths name files (a mounted Kubernetes secret is a file),
and the entry point decides where they come from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from gateway.tenancy.config import TENANT_NAME_PATTERN
from services.common.config import ConfigError, StrictModel

STREAM_PATTERN = r"^[A-Za-z0-9_.:\-{}]{1,128}$"
GROUP_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"


class UsageSettings(StrictModel):
    """Where one record per finished request goes, for billing to consume."""

    enabled: bool = Field(
        default=True, description="Write usage records (to the stream when Redis is configured)."
    )
    stream: str | None = Field(
        default=None,
        pattern=STREAM_PATTERN,
        description=(
            "Redis stream the records are XADDed to; it must start with <redis.key_prefix>: (like every "
            "key the mesh writes). None: <redis.key_prefix>:usage."
        ),
    )
    max_len: int = Field(
        default=1_000_000,
        ge=1000,
        le=1_000_000_000,
        description=(
            "Approximate bound of the stream (XADD MAXLEN ~). Entries beyond it are trimmed even if a "
            "consumer group has not read them: size it for the longest consumer outage you tolerate."
        ),
    )
    consumer_groups: list[Annotated[str, Field(pattern=GROUP_PATTERN)]] = Field(
        default_factory=lambda: ["billing"],
        max_length=32,
        description="Groups created (from the stream's start) if missing, so no record predates its reader.",
    )
    jsonl_path: str | None = Field(
        default=None, description="Also append each record as one JSON line to this file; none = off."
    )
    buffer_records: int = Field(
        default=10_000,
        ge=10,
        le=10_000_000,
        description="Records held while Redis is unreachable; beyond it the oldest are dropped and counted.",
    )
    flush_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="Longest a record waits before it is written."
    )
    redis_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Socket timeout of the writer's Redis connection."
    )

    def stream_key(self, key_prefix: str) -> str:
        """The stream's key under ``key_prefix`` (``redis.key_prefix``); ConfigError if ``stream`` names a
        key outside it."""
        if self.stream is None:
            return f"{key_prefix}:usage"
        if not self.stream.startswith(f"{key_prefix}:"):
            raise ConfigError(
                f"gateway.ops.usage.stream {self.stream!r} must start with redis.key_prefix "
                f"{key_prefix!r} and ':' (or be left out: {key_prefix}:usage)"
            )
        return self.stream


class AuditSettings(StrictModel):
    """The audit log: structured lines on the ``internvl_mesh.audit`` logger."""

    enabled: bool = Field(default=True, description="Log authentication failures, rejections, key changes.")


class MetricsSettings(StrictModel):
    """Per-tenant Prometheus labels with bounded cardinality."""

    tenant_labels: list[Annotated[str, Field(pattern=TENANT_NAME_PATTERN)]] | None = Field(
        default=None,
        max_length=1000,
        description=(
            "Tenants that get their own label value; the rest are counted as 'other'. None labels every "
            "tenant of the tenants file: set a list once there are more than a few dozen tenants."
        ),
    )


class TlsSettings(StrictModel):
    """TLS of the gateway's own gRPC server. Empty paths: plaintext (TLS ends at the Ingress)."""

    cert_file: str = Field(default="", description="PEM certificate chain (e.g. a mounted tls.crt).")
    key_file: str = Field(default="", description="PEM private key (e.g. a mounted tls.key).")
    client_ca_file: str = Field(
        default="", description="PEM CA bundle; set it to require client certificates (mutual TLS)."
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def server_credentials(self):
        """``grpc.ssl_server_credentials`` from the files, read now (a rotated secret needs a restart).

        Raises ``ConfigError`` naming the file that cannot be read, so a replica fails at start-up
        rather than serving plaintext by accident.
        """
        import grpc

        if not self.enabled:
            return None
        cert, key = _read(self.cert_file, "tls.cert_file"), _read(self.key_file, "tls.key_file")
        ca = _read(self.client_ca_file, "tls.client_ca_file") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


class OpsSettings(StrictModel):
    """Everything about running the gateway for several tenants (``GatewaySettings.ops``)."""

    usage: UsageSettings = Field(default_factory=UsageSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
