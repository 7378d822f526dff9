"""The preprocess service as a Ray Serve deployment (the CPU pool).

A plain class; decoration and ``.bind()`` happen in ``build_app``, which a Serve config names by
``import_path``. Handles call ``tile`` (numpy through the object store); Serve's gRPC proxy calls
``TileImages`` (the same servicer as the standalone server).
"""

from __future__ import annotations

from typing import Any

from internvl.preprocess.v1 import preprocess_pb2

from services.common import tracing
from services.common.context import RequestContext
from services.common.grpc_server import via_serve_proxy
from services.common.serve_args import app_args, mesh_signer
from services.common.types import VideoClip
from services.preprocess.config import PreprocessAppArgs
from services.preprocess.pipeline import Preprocessor
from services.preprocess.server import PreprocessServicer


class PreprocessDeployment:
    def __init__(self, args: PreprocessAppArgs):
        tracing.setup_tracing(args.common.tracing, "preprocess")
        self.preprocessor = Preprocessor(args.config)
        self.signer = mesh_signer("preprocess")
        self.servicer = PreprocessServicer(self.preprocessor, self.signer, args.default_max_num)
        self._queued_images = 0

    async def tile(self, items, ctx: RequestContext):
        ctx = self.signer.verify(ctx)
        self._queued_images += len(items)
        try:
            with tracing.span_from(ctx.trace, tracing.SPAN_PREPROCESS, {tracing.ATTR_IMAGES: len(items)}):
                return await self.preprocessor.atile_images(items)
        finally:
            self._queued_images -= len(items)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The stage's own signal for Serve's custom autoscaling (mesh/autoscaling.py): images queued
        for or in the tiling workers."""
        return {"queue_depth": float(self._queued_images)}

    async def tile_video(self, clip: VideoClip, ctx: RequestContext):
        ctx = self.signer.verify(ctx)
        with tracing.span_from(ctx.trace, tracing.SPAN_PREPROCESS, {tracing.ATTR_IMAGES: 1}):
            return await self.preprocessor.atile_video(clip)

    async def TileImages(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        return await via_serve_proxy(
            self.servicer.TileImages(request, grpc_context), grpc_context, preprocess_pb2.TileImagesResponse
        )

    def check_health(self) -> None:
        return None


DEFAULT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4},
    "max_ongoing_requests": 16,
}


def build_app(args: dict[str, Any] | PreprocessAppArgs | None = None):
    """Serve application builder: ``import_path: services.preprocess.deployment:build_app``."""
    from ray import serve

    typed = app_args(PreprocessAppArgs, args, "preprocess")
    options = {**DEFAULT_OPTIONS, **typed.deployment_options}
    deployment = serve.deployment(name="Preprocess", **options)(PreprocessDeployment)
    return deployment.bind(typed)
