"""Encoder and decoder clients of the gateway: over Ray DeploymentHandles, or in process.

The handle clients pass embedding references through unread (a Ray ``ObjectRef`` inside a reference
stays a reference); closing a decoder stream cancels the request in the decoder replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.common.pb import RequestContext
from services.common.refs import EmbeddingRef
from services.common.types import TilingParams


class HandleEncoderClient:
    def __init__(self, handle: Any):
        self.handle = handle

    async def embed(
        self, images: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext
    ) -> list[EmbeddingRef]:
        return await self.handle.embed.remote(list(images), ctx)


class HandleDecoderClient:
    def __init__(self, handle: Any):
        self.handle = handle.options(stream=True)
        self.info_handle = handle

    async def generate(
        self, payload: dict[str, Any], refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[dict[str, Any]]:
        stream = self.handle.generate.remote(payload, refs, ctx)
        finished = False
        try:
            async for event in stream:
                finished = "finish_reason" in event
                yield event
        finally:
            if not finished:
                stream.cancel()  # the client went away: free the decoder's work now

    async def info(self) -> dict[str, Any]:
        return await self.info_handle.info.remote()


class LocalEncoderClient:
    """An in-process ``EncoderCore`` (standalone gateway, tests)."""

    def __init__(self, core: Any):
        self.core = core

    async def embed(self, images, ctx):
        from services.encoder.core import ImageInput

        return await self.core.embed_images(
            [ImageInput(d, t) for d, t in images], namespace=ctx.cache_namespace, priority=ctx.priority
        )


class LocalDecoderClient:
    """An in-process ``DecoderFrontend`` (standalone gateway, tests)."""

    def __init__(self, frontend: Any):
        self.frontend = frontend

    async def generate(self, payload, refs, ctx):
        async for event in self.frontend.generate(payload, refs, ctx):
            yield event

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": self.frontend.core.max_model_len}
