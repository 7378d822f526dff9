"""The mesh's side of ``verify``: the production code, as a replica runs it.

- tiles: ``services.preprocess.pipeline.Preprocessor`` (decode, dynamic tiling), then the encoder's
  normalisation (``services.preprocess.normalize.normalize_tiles``, its CPU path);
- embeddings: ``EncoderCore.embed_images`` over the same preprocessor (the encoder service's core:
  cache lookup, batching, the vision tower and projector), answered inline;
- tokens: ``DecoderFrontend.generate`` over a ``DecoderCore`` (the decoder service's front and
  engine: reference resolution, chat template, continuous batching, paged KV cache), greedy, one
  request at a time.

Each phase loads its model, runs, and releases it, so the device holds one model at a time.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mesh.verify.options import Setup
from services.common.context import ContextSigner, RequestContext
from services.common.refs import EmbeddingRef
from services.common.types import TiledImage, TilingParams
from services.decoder.types import ChatMessage, DecodeRequest, FinishReason, ImagePlaceholder, TextContent

NAMESPACE = "verify"
# Room for the chat template's own text (system message, roles) and the question, beside the images.
TEXT_ALLOWANCE = 1024


@dataclass
class Generation:
    """What the decoder returned for one request."""

    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    error: str | None = None


def tiling_params(setup: Setup) -> TilingParams:
    return TilingParams(max_num=setup.max_num, tile_size=setup.tile_size).validate()


def mesh_tiles(images: Sequence[bytes], params: TilingParams) -> tuple[list[TiledImage], list[torch.Tensor]]:
    """The preprocess service's tiles of each image, and the encoder's normalisation of them on the CPU:
    (tiles, 3, S, S) float32 per image."""
    from services.preprocess.normalize import normalize_tiles
    from services.preprocess.pipeline import Preprocessor

    with Preprocessor() as pre:
        tiled = pre.tile_images([(data, params) for data in images])
    return tiled, [normalize_tiles(torch.from_numpy(t.tiles)) for t in tiled]


async def mesh_embeddings(
    setup: Setup, images: Sequence[bytes], params: TilingParams
) -> tuple[list[EmbeddingRef], list[torch.Tensor]]:
    """Inline references from the encoder core, and their tensors: (tiles, tokens_per_tile, D) float32."""
    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore, ImageInput, PreprocessorTileSource
    from services.preprocess.pipeline import Preprocessor

    with Preprocessor() as pre:
        core = EncoderCore.from_config(
            EncoderConfig(
                checkpoint=str(setup.checkpoint.path),
                device=setup.device,
                dtype=setup.dtype,
                fallback="inline",
            ),
            tile_source=PreprocessorTileSource(pre),
        )
        try:
            refs = await core.embed_images([ImageInput(d, params) for d in images], NAMESPACE, inline=True)
        finally:
            await core.close()
            del core
            _release(setup.device)
    tensors = []
    for ref in refs:
        rows = ref.tensor.to_torch().float()  # (tiles * tokens_per_tile, D)
        tensors.append(rows.reshape(ref.tiles, ref.tokens_per_tile, ref.dim))
    return refs, tensors


def decoder_config(setup: Setup, max_tiles: int, max_new_tokens: int):
    """The decoder's production defaults, with the KV cache sized for one request of this run (the
    default sizing takes a share of the whole device, or a fixed 4 GiB on the CPU)."""
    from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig

    need = max_tiles * setup.tokens_per_tile + TEXT_ALLOWANCE + max_new_tokens
    limit = int(setup.checkpoint.text_config.get("max_position_embeddings", need))
    max_model_len = min(need, limit)
    cache = CacheConfig()
    return DecoderConfig(
        model=str(setup.checkpoint.path),
        dtype=setup.dtype,
        device=setup.device,
        cache=CacheConfig(num_blocks=-(-max_model_len // cache.block_size) + 1),
        scheduler=SchedulerConfig(max_model_len=max_model_len),
    )


async def mesh_generate(
    setup: Setup,
    refs: Sequence[EmbeddingRef],
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[Generation]:
    """Greedy tokens for each (image, prompt) request, sent one at a time through the decoder's front."""
    from services.decoder.engine.async_engine import DecoderCore
    from services.decoder.engine.sampling_params import SamplingParams
    from services.decoder.server import DecoderFrontend
    from services.embedding_cache.resolver import EmbeddingResolver

    core = DecoderCore(decoder_config(setup, max(r.tiles for r in refs), max_new_tokens))
    signer = ContextSigner(ContextSigner.new_secret().encode())  # this process signs and verifies
    frontend = DecoderFrontend(core, EmbeddingResolver(None), signer)
    out = []
    try:
        for k, (ref, prompt) in enumerate(zip(refs, prompts, strict=True)):
            request = DecodeRequest(
                messages=request_messages(prompt),
                sampling=SamplingParams(temperature=0.0),
                max_tokens=max_new_tokens,
            )
            ctx = signer.sign(RequestContext(request_id=f"verify-{k}", cache_namespace=NAMESPACE))
            events = [e async for e in frontend.generate(request, [ref], ctx)]
            last = events[-1]
            out.append(
                Generation(
                    tokens=[t for e in events for t in e.token_ids],
                    prompt_tokens=last.usage.prompt_tokens if last.usage is not None else 0,
                    finish_reason=last.finish_reason.value if last.finish_reason is not None else "",
                    error=last.error if last.finish_reason == FinishReason.ERROR else None,
                )
            )
    finally:
        core.shutdown()
        del core, frontend
        _release(setup.device)
    return out


def request_messages(prompt: str) -> list[ChatMessage]:
    """One user turn: the image, then the question (the order transformers' examples use)."""
    return [ChatMessage(role="user", content=[ImagePlaceholder(), TextContent(prompt)])]


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
