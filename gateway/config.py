"""The gateway's settings: where it listens, its tenants, timeouts, remote images and operations.

Validated once where the mesh config is built (``mesh.topology.MeshConfig.gateway``) and again in each
gateway replica from its Serve application's args.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from gateway.ops_config import OpsSettings
from services.common.config import CommonConfig, ConfigError, StrictModel
from services.common.limits import MAX_IMAGE_BYTES, MAX_TILES_PER_IMAGE

# Serve's max_replicas for num_replicas="auto" without an autoscaling_config of one's own.
SERVE_AUTO_MAX_REPLICAS = 100


class RemoteImageSettings(StrictModel):
    hosts: list[str] = Field(
        default_factory=list, max_length=1000, description="Allowed hosts: exact names or *.domain patterns."
    )
    max_bytes: int = Field(
        default=MAX_IMAGE_BYTES,
        ge=1024,
        le=MAX_IMAGE_BYTES,
        description="Largest image fetched (20 MiB, the mesh's bound on any image; lower only tightens it).",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class GatewaySettings(StrictModel):
    host: str = Field(
        default="127.0.0.1",
        description=(
            "Bind address of every listener of the mesh (Serve's HTTP proxy, the gateway's gRPC server, "
            "the metrics listener); 0.0.0.0 to serve other machines (the chart sets it)."
        ),
    )
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=9000, ge=0, le=65535, description="Public gRPC port; 0 disables it.")
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description=(
            "Prometheus metrics (GET /metrics) of each gateway replica, on its own listener bound to host; "
            "0 disables it. Never on the public HTTP port."
        ),
    )
    serve_grpc_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "Ray Serve's own gRPC proxy to the internal services (routed by `application` metadata); 0 = off. "
            "Development only: it listens on every interface, unauthenticated, bypassing the gateway."
        ),
    )
    tenants_file: str = Field(
        default="", description="YAML of tenants and API-key digests; empty = single tenant."
    )
    default_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    max_timeout_s: float = Field(default=600.0, gt=0, le=86_400)
    allow_remote_images: bool = Field(default=False, description="Fetch http(s) image URLs (off: SSRF).")
    remote_images: RemoteImageSettings = Field(
        default_factory=lambda: RemoteImageSettings(),
        description="Where and how remote images may be fetched, when allow_remote_images is on.",
    )
    limits_fail_closed: bool = Field(default=False, description="Refuse requests when Redis limits are down.")
    ops: OpsSettings = Field(
        default_factory=OpsSettings, description="Usage records, audit log, tenant metric labels, gRPC TLS."
    )


class ModelApps(StrictModel):
    """One served model as the gateway reaches it: its public name and the Serve applications of its pools."""

    name: str = Field(min_length=1, max_length=128)
    encoder_app: str = Field(min_length=1, max_length=128)
    decoder_app: str = Field(min_length=1, max_length=128)
    max_tiles_per_image: int = Field(default=12, ge=1, le=MAX_TILES_PER_IMAGE)


class GatewayAppArgs(StrictModel):
    """The args of the gateway's Serve application (``gateway.deployment:build_app``)."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    models: list[ModelApps] = Field(min_length=1, max_length=32)
    preprocess_app: str | None = Field(
        default="preprocess",
        min_length=1,
        max_length=128,
        description="The preprocess application internal clients' TileImages reach; None: not served.",
    )
    common: CommonConfig = Field(default_factory=CommonConfig)
    deployment_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options (resources, scaling)."
    )

    @model_validator(mode="after")
    def _usage_stream_under_prefix(self) -> GatewayAppArgs:
        try:
            self.gateway.ops.usage.stream_key(self.common.redis.key_prefix)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas of this deployment Serve may run at once (``autoscaling_config.max_replicas``,
        else an integer ``num_replicas``, else Serve's defaults): while Redis is down each replica grants
        1 / max_replicas of every limit, so the fleet together never exceeds them."""
        autoscaling = self.deployment_options.get("autoscaling_config") or {}
        replicas = self.deployment_options.get("num_replicas", 1)
        if autoscaling.get("max_replicas"):
            return int(autoscaling["max_replicas"])
        if replicas == "auto":
            return SERVE_AUTO_MAX_REPLICAS
        return max(1, int(replicas or 1))
