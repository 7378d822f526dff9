"""The two peers the mesh benchmark measures the mesh against, each in this process
(``benchmarks/mesh_bench.py`` runs them):

- ``Monolith``: the reference pipeline in one process: OpenGVLab's PIL/numpy tiling, the checkpoint's
  chat template via ``AutoTokenizer``, ``InternVLForConditionalGeneration.generate(pixel_values=...)``;
- ``InProcess``: the mesh's own cores (``Preprocessor``, ``EncoderCore``, ``DecoderFrontend`` over
  ``DecoderCore``) without any hop between them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from services.common.context import ContextSigner
from services.common.types import TilingParams
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
)
from services.demo.reference import reference_load_image

MAX_NUM = 12
MAX_TOKENS = 16
# An explicit KV cache (1280 blocks x 16 tokens, ~250 MB for this preset): the decoder's default on CPU
# budgets 90% of the machine's memory, which two decoders (replica + in-process) on a shared box cannot have.
KV_CACHE = {"num_blocks": 1280}


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def template_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]


def decode_request(question: str, max_tokens: int) -> DecodeRequest:
    """The decoder's request of one greedy question (the question before the image)."""
    return DecodeRequest(
        messages=[ChatMessage("user", [TextContent(question), ImagePlaceholder()])],
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )


# -- the monolith ---------------------------------------------------------------------------------
class _FirstToken:
    """A ``generate`` streamer: the first ``put`` is the prompt, the second the first new token."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class Monolith:
    """The reference in one process: PIL/numpy tiling, chat template, ``generate(pixel_values=...)``."""

    def __init__(self, ckpt: Path):
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        self.model = InternVLForConditionalGeneration.from_pretrained(ckpt).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)

    def run(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        t0 = time.perf_counter()
        pixels = torch.from_numpy(reference_load_image(data, max_num=MAX_NUM))
        t_tiles = time.perf_counter()
        prompt = self.tokenizer.apply_chat_template(
            template_messages(question), tokenize=False, add_generation_prompt=True
        )
        before, after = prompt.split("<IMG_CONTEXT>")
        expanded = before + "<img>" + "<IMG_CONTEXT>" * (256 * pixels.shape[0]) + "</img>" + after
        ids = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt").input_ids
        streamer = _FirstToken()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                pixel_values=pixels,
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=streamer,
            )
        t_end = time.perf_counter()
        return {
            "tiles": int(pixels.shape[0]),
            "prompt_tokens": int(ids.shape[1]),
            "completion_tokens": int(out.shape[1] - ids.shape[1]),
            "tiling_ms": ms(t_tiles - t0),
            "ttft_ms": ms((streamer.at or t_end) - t0),
            "total_ms": ms(t_end - t0),
            "text": self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
        }


# -- the mesh's cores in this process -------------------------------------------------------------
class InProcess:
    """Preprocessor -> EncoderCore (inline refs, no cache) -> DecoderFrontend: the mesh minus its hops."""

    def __init__(self, ckpt: Path, loop: asyncio.AbstractEventLoop):
        from services.decoder.config import CacheConfig, DecoderConfig
        from services.decoder.engine.async_engine import DecoderCore
        from services.decoder.server import DecoderFrontend
        from services.embedding_cache.resolver import EmbeddingResolver
        from services.encoder.config import EncoderConfig
        from services.encoder.core import EncoderCore, PreprocessorTileSource
        from services.preprocess.config import PreprocessConfig
        from services.preprocess.pipeline import Preprocessor

        self.loop = loop
        self.pre = Preprocessor(PreprocessConfig())
        self.encoder = EncoderCore.from_config(
            EncoderConfig(
                checkpoint=str(ckpt),
                device="cpu",
                dtype="float32",
                fallback="inline",
                max_tiles_per_image=MAX_NUM + 1,
            ),
            tile_source=PreprocessorTileSource(self.pre),
        )
        self.decoder = DecoderCore(
            DecoderConfig(model=str(ckpt), dtype="float32", device="cpu", cache=CacheConfig(**KV_CACHE))
        )
        self.signer = ContextSigner(ContextSigner.new_secret().encode())  # signs and verifies in process
        self.frontend = DecoderFrontend(self.decoder, EmbeddingResolver(None), self.signer)

    def run(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        return self.loop.run_until_complete(self._run(question, data, max_tokens))

    async def _run(self, question: str, data: bytes, max_tokens: int) -> dict[str, Any]:
        from services.common.context import RequestContext

        params = TilingParams(max_num=MAX_NUM)
        t0 = time.perf_counter()
        tiled = await self.pre.atile_images([(data, params)])
        t1 = time.perf_counter()
        refs = await self.encoder.embed_tiles(tiled, "default", params)
        t2 = time.perf_counter()
        request = decode_request(question, max_tokens)
        ctx = self.signer.sign(
            RequestContext(request_id=f"inproc-{uuid.uuid4().hex[:12]}", cache_namespace="default")
        )
        first, tokens = None, 0
        async for event in self.frontend.generate(request, refs, ctx):
            first = first or time.perf_counter()
            tokens += len(event.token_ids)
        t3 = time.perf_counter()
        return {
            "preprocess_ms": ms(t1 - t0),
            "encode_ms": ms(t2 - t1),
            "decode_ttft_ms": ms(first - t2),
            "decode_total_ms": ms(t3 - t2),
            "ttft_ms": ms(first - t0),
            "total_ms": ms(t3 - t0),
            "completion_tokens": tokens,
        }

    def cached(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        """The same image and question again: an embedding (LRU) hit and a KV prefix hit."""
        return self.loop.run_until_complete(self._cached(question, data, max_tokens))

    async def _cached(self, question: str, data: bytes, max_tokens: int) -> dict[str, Any]:
        from services.common.context import RequestContext
        from services.encoder.core import ImageInput

        t0 = time.perf_counter()
        refs = await self.encoder.embed_images([ImageInput(data, TilingParams(max_num=MAX_NUM))], "default")
        t1 = time.perf_counter()
        ctx = self.signer.sign(
            RequestContext(request_id=f"inproc-{uuid.uuid4().hex[:12]}", cache_namespace="default")
        )
        first = None
        async for _event in self.frontend.generate(decode_request(question, max_tokens), refs, ctx):
            first = first or time.perf_counter()
        t2 = time.perf_counter()
        return {
            "embed_ms": ms(t1 - t0),
            "decode_ttft_ms": ms(first - t1),
            "ttft_ms": ms(first - t0),
            "total_ms": ms(t2 - t0),
            "embedding_hit": refs[0].cache_hit,
        }

    def close(self) -> None:
        self.decoder.shutdown()
        self.loop.run_until_complete(self.encoder.close())
        self.pre.close()
