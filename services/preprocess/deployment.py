"""The preprocess service as a Ray Serve deployment (the CPU pool).

A plain class; decoration and ``.bind()`` happen in ``build_app``, which a Serve config names by
``import_path``. Handles call ``tile`` (numpy through the object store); Serve's gRPC proxy calls
``TileImages`` (the same servicer as the standalone server).
"""

from __future__ import annotations

from typing import Any

from services.common import tracing
from services.common.pb import RequestContext
from services.common.serve_args import common_config
from services.preprocess.config import PreprocessConfig
from services.preprocess.pipeline import Preprocessor
from services.preprocess.server import PreprocessServicer


class PreprocessDeployment:
    def __init__(
        self,
        config: dict[str, Any] | None = None,
        default_max_num: int = 12,
        common: dict[str, Any] | None = None,
    ):
        tracing.setup_tracing(common_config(common).tracing, "preprocess")
        self.preprocessor = Preprocessor(PreprocessConfig.model_validate(config or {}))
        self.servicer = PreprocessServicer(self.preprocessor, default_max_num)

    async def tile(self, items, ctx: RequestContext | None = None):
        with tracing.span_from(
            ctx.trace if ctx else None, tracing.SPAN_PREPROCESS, {tracing.ATTR_IMAGES: len(items)}
        ):
            return await self.preprocessor.atile_images(items)

    async def TileImages(self, request, grpc_context=None):  # noqa: N802 - gRPC method name
        return await self.servicer.TileImages(request, grpc_context)

    def check_health(self) -> None:
        return None


DEFAULT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4},
    "max_ongoing_requests": 16,
}


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder: ``import_path: services.preprocess.deployment:build_app``."""
    from ray import serve

    args = dict(args or {})
    options = {**DEFAULT_OPTIONS, **args.pop("deployment_options", {})}
    deployment = serve.deployment(name="Preprocess", **options)(PreprocessDeployment)
    return deployment.bind(args.get("config"), args.get("default_max_num", 12), args.get("common"))
