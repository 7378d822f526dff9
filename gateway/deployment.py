"""The gateway as the ingress Ray Serve deployment.

HTTP comes through Serve's HTTP proxy into the FastAPI app built per replica
(``__serve_build_asgi_app__``). The public gRPC API is this replica's own grpc.aio server on
``grpc_port`` with standard health and reflection, and its Prometheus metrics are its own listener on
``metrics_port``, both bound to ``host`` (both set SO_REUSEPORT, so several replicas on one node share
the ports). The gRPC server also serves the internal services' APIs to internal clients
(``gateway.internal_api``). Preprocess, encoders and decoders are reached through DeploymentHandles of
their applications.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.audit import AuditedKeyStore, AuditLog
from gateway.clients import HandleDecoderClient, HandleEncoderClient, HandlePreprocessClient
from gateway.config import GatewayAppArgs, GatewaySettings
from gateway.core import Gateway, GatewayLimits, ModelRoute
from gateway.limits_redis import check_limits_redis
from gateway.metrics import GatewayMetrics, MetricsListener
from gateway.usage import UsageRecorder
from services.common import tracing
from services.common.config import RedisConfig
from services.common.serve_args import app_args, limits_redis_url, mesh_signer

log = logging.getLogger(__name__)


def build_tenancy(
    settings: GatewaySettings,
    redis: RedisConfig,
    redis_url: str,
    registry=None,
    audit: AuditLog | None = None,
    replicas: int = 1,
):
    """Key store and limiter from settings (the entry point of a gateway replica reads env here).
    ``redis_url`` is the limits Redis; the limiter's keys live under ``redis.key_prefix``, its pool
    holds ``redis.max_connections``, and while Redis is down this replica grants 1 / ``replicas`` (the
    most gateway replicas that can run) of every limit. Leases are renewed up to ``max_timeout_s``."""
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import FallbackLimiter, LocalLimiter, RedisLimiter

    path = settings.tenants_file or None
    keys = AuditedKeyStore(path, audit=audit) if audit is not None else KeyStore(path)
    hold = settings.max_timeout_s
    local = (
        LocalLimiter.for_replicas(replicas, max_hold_s=hold) if redis_url else LocalLimiter(max_hold_s=hold)
    )
    limiter = (
        FallbackLimiter(
            RedisLimiter.from_url(
                redis_url,
                prefix=f"{redis.key_prefix}:lim:",
                max_connections=redis.max_connections,
                max_hold_s=hold,
            ),
            local,
            fail_closed=settings.limits_fail_closed,
            **({"registry": registry} if registry is not None else {}),
        )
        if redis_url
        else local
    )
    return keys, limiter


def build_usage(
    settings: GatewaySettings, redis: RedisConfig, redis_url: str, **kwargs: Any
) -> UsageRecorder | None:
    """The usage recorder (not started; ``kwargs`` go to it), or None when usage records are off or
    have nowhere to go. ``redis_url`` is the limits Redis; the stream lives under ``redis.key_prefix``
    and the connection pool holds ``redis.max_connections``."""
    usage = settings.ops.usage
    if not usage.enabled or not (redis_url or usage.jsonl_path):
        return None
    return UsageRecorder.from_url(
        usage, redis_url, key_prefix=redis.key_prefix, max_connections=redis.max_connections, **kwargs
    )


def _fetcher(settings: GatewaySettings):
    if not settings.allow_remote_images:
        return None
    from gateway.fetch import RemoteImageFetcher

    r = settings.remote_images
    return RemoteImageFetcher(r.hosts, max_bytes=r.max_bytes, timeout_s=r.timeout_s)


class GatewayDeployment:
    async def __init__(self, args: GatewayAppArgs):
        from ray import serve

        from gateway.grpc_api import GatewayServicer
        from gateway.internal import InternalDoor
        from gateway.internal_api import internal_registrations
        from services.common.grpc_server import start_server

        self.settings, cfg = args.gateway, args.common
        tracing.setup_tracing(cfg.tracing, "gateway")
        ops = self.settings.ops
        redis_url = limits_redis_url(cfg)  # limit counters and usage records: never evicted
        await check_limits_redis(redis_url, cfg.redis, cfg.cache.ttl_s)
        audit = AuditLog() if ops.audit.enabled else None
        self.keys, self.limiter = build_tenancy(
            self.settings, cfg.redis, redis_url, audit=audit, replicas=args.max_replicas
        )
        observers = [GatewayMetrics(tenant_labels=ops.metrics.tenant_labels), *([audit] if audit else [])]
        self.usage = build_usage(self.settings, cfg.redis, redis_url)
        if self.usage is not None:
            observers.append(self.usage.start())
        if self.keys.single_tenant:
            log.warning("no tenants file configured: serving single-tenant, without API keys")
        await self.keys.start()
        routes = []
        for m in args.models:
            decoder = HandleDecoderClient(serve.get_app_handle(m.decoder_app))
            info = await decoder.info()
            routes.append(
                ModelRoute(
                    name=m.name,
                    encoder=HandleEncoderClient(serve.get_app_handle(m.encoder_app)),
                    decoder=decoder,
                    max_tiles_per_image=m.max_tiles_per_image,
                    max_model_len=int(info["max_model_len"]),
                )
            )
        self.gateway = Gateway(
            routes,
            self.keys,
            self.limiter,
            GatewayLimits(
                default_timeout_s=self.settings.default_timeout_s, max_timeout_s=self.settings.max_timeout_s
            ),
            observers=observers,
            fetcher=_fetcher(self.settings),
            signer=mesh_signer("gateway"),
        )
        self.grpc = None
        if self.settings.grpc_port:
            tls = ops.tls.server_credentials()  # None: plaintext, TLS ends at the Ingress
            app = args.preprocess_app
            door = InternalDoor(
                self.gateway, HandlePreprocessClient(serve.get_app_handle(app)) if app else None
            )
            self.grpc = await start_server(
                [GatewayServicer(self.gateway).registration(), *internal_registrations(door)],
                host=self.settings.host,
                port=self.settings.grpc_port,
                max_message_bytes=cfg.grpc.max_message_bytes,
                **({"credentials": tls} if tls is not None else {}),
            )
        self.metrics = None
        if self.settings.metrics_port:
            self.metrics = MetricsListener(self.settings.host, self.settings.metrics_port)

    def __serve_build_asgi_app__(self):
        from gateway.http_api import create_http_app

        return create_http_app(self.gateway)

    async def check_health(self) -> None:
        return None

    def __del__(self):
        # Serve calls this when the replica stops: write the buffered usage records first.
        if getattr(self, "usage", None) is not None:
            self.usage.close(timeout=2.0)
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


def build_app(args: dict[str, Any] | GatewayAppArgs):
    """Serve application builder: ``import_path: gateway.deployment:build_app``."""
    from ray import serve

    typed = app_args(GatewayAppArgs, args, "gateway")
    deployment = serve.deployment(name="Gateway", **typed.deployment_options)(
        serve.ingress()(GatewayDeployment)
    )
    return deployment.bind(typed)
