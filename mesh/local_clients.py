"""The gateway's encoder and decoder clients for cores in the same process (standalone use and tests).

They satisfy ``gateway.core.EncoderClient`` / ``DecoderClient`` with an ``EncoderCore`` and a
``DecoderFrontend`` instead of Ray handles; they live here, in the composition package, because the
gateway itself never imports the encoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.common.context import RequestContext
from services.common.refs import EmbeddingRef
from services.common.types import TilingParams, VideoClip
from services.decoder.server import DecoderFrontend
from services.decoder.types import ChatMessage, DecodeRequest, GenerationEvent
from services.encoder.core import EncoderCore, ImageInput


class LocalEncoderClient:
    """An in-process ``EncoderCore`` (standalone gateway, tests)."""

    def __init__(self, core: EncoderCore):
        self.core = core

    async def embed(
        self,
        images: Sequence[tuple[bytes, TilingParams] | VideoClip],
        ctx: RequestContext,
        inline: bool = False,
    ) -> list[EmbeddingRef]:
        return await self.core.embed_images(
            [item if isinstance(item, VideoClip) else ImageInput(*item) for item in images],
            namespace=ctx.cache_namespace,
            priority=ctx.priority,
            inline=inline,
        )


class LocalDecoderClient:
    """An in-process ``DecoderFrontend`` (standalone gateway, tests)."""

    def __init__(self, frontend: DecoderFrontend):
        self.frontend = frontend

    async def generate(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[GenerationEvent]:
        async for event in self.frontend.generate(request, refs, ctx):
            yield event

    async def count_tokens(
        self, messages: list[ChatMessage], image_tiles: list[int], ctx: RequestContext
    ) -> tuple[int, int]:
        return self.frontend.count_tokens(messages, image_tiles, ctx)

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": self.frontend.core.max_model_len}
