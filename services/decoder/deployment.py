"""The decoder as a Ray Serve deployment (the language pool).

Handles call ``generate`` as a streaming method (``handle.options(stream=True)``) with a ``DecodeRequest``,
its embedding references and the ``RequestContext``, and get ``GenerationEvent`` s back (both pickle);
closing the handle's stream cancels the request in the engine, freeing its KV blocks. Serve's gRPC proxy calls
``Generate`` / ``CountTokens``, the same servicer as a standalone server. Every entry point goes through
the frontend, which verifies the gateway's signature on the context first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from internvl.decoder.v1 import decoder_pb2

from services.common import tracing
from services.common.context import RequestContext
from services.common.grpc_server import stream_via_serve_proxy, via_serve_proxy
from services.common.refs import EmbeddingRef
from services.common.serve_args import app_args, mesh_signer, redis_url_with_password, resolve_device
from services.decoder.autoscaling import autoscaling_stats
from services.decoder.config import DecoderAppArgs
from services.decoder.server import DecoderFrontend, DecoderServicer
from services.decoder.types import ChatMessage, DecodeRequest
from services.embedding_cache.config import shared_store_config
from services.embedding_cache.redis_store import RedisEmbeddingStore
from services.embedding_cache.resolver import EmbeddingResolver


class DecoderDeployment:
    async def __init__(self, args: DecoderAppArgs):
        from services.decoder.engine.async_engine import DecoderCore

        cfg, model = args.common, args.model
        tracing.setup_tracing(cfg.tracing, "decoder")
        self.core = DecoderCore(args.decoder_config(resolve_device(model.device).split(":")[0]))
        shared = shared_store_config(cfg, redis_url_with_password(cfg))
        store = RedisEmbeddingStore(shared) if shared is not None else None
        self.frontend = DecoderFrontend(self.core, EmbeddingResolver(store), mesh_signer("decoder"))
        self.servicer = DecoderServicer(self.frontend)
        self._gauges = _ray_gauges(model.name)
        self._tenant_gauges = TenantGauges(model.name)
        self._stats_task = asyncio.get_running_loop().create_task(self._publish_stats())

    async def _publish_stats(self, interval_s: float = 1.0) -> None:
        """Push the engine's load into Ray's metrics agent (exported per node as ray_internvl_mesh_*)."""
        while True:
            stats = self.core.stats()
            for name, gauge in self._gauges.items():
                gauge.set(float(stats.get(name, 0.0)))
            self._tenant_gauges.publish(stats.get("tenants", {}))
            await asyncio.sleep(interval_s)

    async def generate(self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext):
        async for event in self.frontend.generate(request, refs, ctx):
            yield event

    def count_tokens(
        self, messages: list[ChatMessage], image_tiles: list[int], ctx: RequestContext
    ) -> tuple[int, int]:
        return self.frontend.count_tokens(messages, image_tiles, ctx)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The stage's own signals for Serve's custom autoscaling (mesh/autoscaling.py): prompt tokens
        waiting in the scheduler and the KV cache's usage."""
        return autoscaling_stats(self.core.stats())

    def info(self) -> dict[str, Any]:
        return {"max_model_len": self.core.max_model_len, **self.core.stats()}

    async def Generate(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        async for item in stream_via_serve_proxy(self.servicer.Generate(request, grpc_context), grpc_context):
            yield item

    async def CountTokens(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        return await via_serve_proxy(
            self.servicer.CountTokens(request, grpc_context), grpc_context, decoder_pb2.CountTokensResponse
        )

    def check_health(self) -> None:
        """Serve replaces a replica whose engine (process) is gone."""
        self.core.check_health()

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()


def _ray_gauges(model: str) -> dict[str, Any]:
    from ray.util.metrics import Gauge

    # vLLM's names under our prefix. The preemption count is the engine's running total, pushed as a
    # gauge like the others; PromQL's rate() reads it as it reads vLLM's counter.
    described = {
        "running": ("internvl_mesh_num_requests_running", "Requests in the running batch."),
        "waiting": ("internvl_mesh_num_requests_waiting", "Requests waiting to be scheduled."),
        "kv_usage": ("internvl_mesh_kv_cache_usage_perc", "Fraction of KV-cache blocks in use."),
        "preemptions": ("internvl_mesh_num_preemptions_total", "Preemptions since start."),
    }
    gauges = {}
    for key, (name, doc) in described.items():
        gauge = Gauge(name, description=doc, tag_keys=("model",))
        gauge.set_default_tags({"model": model})
        gauges[key] = gauge
    return gauges


class TenantGauges:
    """The fair share's per-tenant figures (``Scheduler.tenant_stats``) as Ray gauges tagged with the
    model and the tenant; tenants past the label bound are summed under ``other``."""

    DESCRIBED = {
        "tokens": ("internvl_mesh_tenant_tokens_scheduled", "Tokens scheduled for the tenant's requests."),
        "queue_s": ("internvl_mesh_tenant_queue_seconds", "Seconds the tenant's requests waited to run."),
        "passed_over": (
            "internvl_mesh_tenant_passed_over",
            "Admissions of other tenants while one of this tenant's requests waited.",
        ),
        "running": ("internvl_mesh_tenant_requests_running", "The tenant's requests in the running batch."),
        "waiting": ("internvl_mesh_tenant_requests_waiting", "The tenant's requests waiting."),
        "kv_blocks": ("internvl_mesh_tenant_kv_blocks", "KV-cache blocks the tenant's requests hold."),
    }

    def __init__(self, model: str):
        from ray.util.metrics import Gauge

        from services.common.tenant_labels import TenantLabels

        self.labels = TenantLabels()
        self.gauges = {}
        for key, (name, doc) in self.DESCRIBED.items():
            gauge = Gauge(name, description=doc, tag_keys=("model", "tenant"))
            gauge.set_default_tags({"model": model})
            self.gauges[key] = gauge

    def publish(self, tenants: dict[str, dict[str, float]]) -> None:
        summed: dict[str, dict[str, float]] = {}
        for tenant, figures in tenants.items():
            row = summed.setdefault(self.labels(tenant), dict.fromkeys(self.DESCRIBED, 0.0))
            for key in self.DESCRIBED:
                row[key] += float(figures.get(key, 0.0))
        for label, row in summed.items():
            for key, gauge in self.gauges.items():
                gauge.set(row[key], tags={"tenant": label})


def build_app(args: dict[str, Any] | DecoderAppArgs):
    """Serve application builder: ``import_path: services.decoder.deployment:build_app``."""
    from ray import serve

    typed = app_args(DecoderAppArgs, args, "decoder")
    deployment = serve.deployment(name="Decoder", **typed.deployment_options)(DecoderDeployment)
    return deployment.bind(typed)
