"""The vision encoder as a Ray Serve deployment (the vision pool).

A plain class; ``build_app`` decorates and binds it, and a Serve config names it by ``import_path``.
Handles call ``embed`` (image bytes in, ``EmbeddingRef``s out; on a Redis outage the references are
Ray ``ObjectRef``s that the gateway hands to the decoder unread). Serve's gRPC proxy calls
``EmbedImages``, the same servicer as the standalone server. Both verify the gateway's signature on the
request context first, and pass the verified context on to the preprocess application.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from internvl.encoder.v1 import encoder_pb2

from services.common import tracing
from services.common.context import RequestContext
from services.common.grpc_server import via_serve_proxy
from services.common.refs import KIND_OBJECT
from services.common.serve_args import app_args, mesh_signer, redis_url_with_password, resolve_device
from services.common.types import TilingParams, VideoClip
from services.encoder.config import EncoderAppArgs
from services.encoder.core import EncoderCore, ImageInput
from services.encoder.server import EncoderServicer

log = logging.getLogger(__name__)


class HandleTileSource:
    """Tiles misses through the preprocess application's DeploymentHandle."""

    def __init__(self, app_name: str):
        from ray import serve

        self.handle = serve.get_app_handle(app_name)

    async def tile(self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext | None = None):
        # Runs inside the encoder's span (contextvars follow the task): pass it to preprocess, with the
        # signed context of the request (preprocess verifies it too).
        ctx = replace(ctx or RequestContext(), trace=tracing.current_carrier())
        return await self.handle.tile.remote(list(items), ctx)

    async def tile_video(self, clip: VideoClip, ctx: RequestContext | None = None):
        ctx = replace(ctx or RequestContext(), trace=tracing.current_carrier())
        return await self.handle.tile_video.remote(clip, ctx)


class EncoderDeployment:
    def __init__(self, args: EncoderAppArgs):
        cfg, model = args.common, args.model
        tracing.setup_tracing(cfg.tracing, "encoder")
        config = args.encoder_config(resolve_device(model.device), redis_url_with_password(cfg))
        tile_source = HandleTileSource(args.preprocess_app) if args.preprocess_app else None
        self.core = EncoderCore.from_config(config, tile_source=tile_source)
        self.signer = mesh_signer("encoder")
        self.servicer = EncoderServicer(self.core, self.signer, model.max_tiles_per_image)
        self.model_name = model.name
        self._recent: collections.deque = collections.deque()

    async def embed(
        self, images: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext, inline: bool = False
    ):
        """References for the images. ``inline`` returns the tensors themselves instead: the gateway
        asks for that when a first set of references could not be read by the decoder."""
        import time

        ctx = self.signer.verify(ctx)
        remaining = ctx.remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        inputs = [item if isinstance(item, VideoClip) else ImageInput(*item) for item in images]
        with tracing.span_from(ctx.trace, tracing.SPAN_ENCODER, {tracing.ATTR_IMAGES: len(inputs)}) as span:
            refs = await self.core.embed_images(
                inputs,
                namespace=ctx.cache_namespace,
                priority=ctx.priority,
                deadline=deadline,
                tenant=ctx.tenant,
                weight=ctx.weight,
                inline=inline,
                ctx=ctx,
            )
            span.set_attribute(tracing.ATTR_CACHE_HIT, all(r.cache_hit for r in refs))
            self._hold([r.object_ref for r in refs if r.kind == KIND_OBJECT])
            return refs

    def _hold(self, object_refs: list, keep_s: float = 30.0) -> None:
        """Keep the objects this replica put alive for a while. The gateway and decoder borrow them,
        but a reference returned inside a response can be released here before the borrow is
        registered downstream; holding it for the life of a request closes that window."""
        import time

        now = time.monotonic()
        self._recent.extend((now, ref) for ref in object_refs)
        while self._recent and self._recent[0][0] < now - keep_s:
            self._recent.popleft()

    def stats(self) -> dict[str, int]:
        return self.core.stats.as_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The stage's own signal for Serve's custom autoscaling (mesh/autoscaling.py): tiles waiting
        in the batcher for the vision tower."""
        return {"tiles_waiting": float(self.core.batcher.queued_tiles)}

    async def EmbedImages(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        return await via_serve_proxy(
            self.servicer.EmbedImages(request, grpc_context), grpc_context, encoder_pb2.EmbedImagesResponse
        )

    async def check_health(self) -> None:
        return None


def build_app(args: dict[str, Any] | EncoderAppArgs):
    """Serve application builder: ``import_path: services.encoder.deployment:build_app``."""
    from ray import serve

    typed = app_args(EncoderAppArgs, args, "encoder")
    deployment = serve.deployment(name="Encoder", **typed.deployment_options)(EncoderDeployment)
    return deployment.bind(typed)
