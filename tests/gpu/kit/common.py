"""Helpers the stages share: checkpoints, the engine, prompts, timing on the target device."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .report import free_memory

# Qwen2.5-1.5B's language model, 4 layers deep: the widths and the vocabulary that set its costs.
QWEN25_15B_TEXT = dict(
    vocab_size=151_936,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    num_hidden_layers=4,
    max_position_embeddings=32_768,
)


def tiny_checkpoint(ctx) -> Path:
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    path = ctx.work / "tiny"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, preset="tiny", llm="qwen2")
    return path


def qwen_shaped_checkpoint(ctx) -> Path:
    """A random checkpoint with Qwen2.5-1.5B's text widths (4 layers) and the tiny vision tower."""
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    path = ctx.work / "qwen2_5_1_5b_4l"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, preset="tiny", llm="qwen2", text_overrides=QWEN25_15B_TEXT)
    return path


def decode_checkpoint(ctx) -> Path:
    """The model stages 3 and 4 time: the tiny one in smoke mode, else the Qwen-shaped one."""
    return tiny_checkpoint(ctx) if ctx.smoke else qwen_shaped_checkpoint(ctx)


# The switches the kit proves before they become defaults: name -> ``DecoderConfig`` overrides. Each is
# off by default (README, GPU verification) until stage 2 passes with it on, on a real card.
SWITCHES: dict[str, dict] = {
    "triton_paged": {"attention_backend": "triton_paged"},
    "cuda_graphs": {"compile": {"cuda_graphs": True}},
    "triton_paged+cuda_graphs": {"attention_backend": "triton_paged", "compile": {"cuda_graphs": True}},
}


def switch_unavailable(name: str, device: str) -> str | None:
    """Why switch ``name`` is not run on ``device`` here, or None when it runs."""
    from services.decoder.attention.registry import is_backend_available

    if "triton_paged" in name:
        if device != "cuda":
            return "the Triton kernel runs compiled on CUDA only (its CPU interpreter run is tests/decoder's)"
        if not is_backend_available("triton_paged", device):
            return "triton is not installed"
    return None


def make_engine(
    ckpt: Path, device: str, dtype: str, max_num_seqs: int = 16, max_model_len: int = 2048, **overrides
):
    """An engine of ``ckpt``; ``overrides`` are ``DecoderConfig`` fields (a ``SWITCHES`` entry)."""
    from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
    from services.decoder.engine.llm_engine import LLMEngine

    return LLMEngine(
        DecoderConfig(
            model=str(ckpt),
            device=device,
            dtype=dtype,
            # CUDA: sized from free memory (capped at what max_num_seqs full sequences use); CPU: exactly that
            cache=CacheConfig(
                memory_fraction=0.6,
                num_blocks=None if device == "cuda" else max_num_seqs * -(-max_model_len // 16),
                enable_prefix_caching=False,
            ),
            scheduler=SchedulerConfig(
                max_model_len=max_model_len,
                max_num_batched_tokens=max(4096, max_model_len),
                max_num_seqs=max_num_seqs,
            ),
            **overrides,
        )
    )


def engine_model(engine) -> torch.nn.Module:
    """The engine's language model: ``LLMEngine.executor`` (``LocalExecutor``) ``.runner.model``."""
    return engine.executor.runner.model


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids drawn above the special tokens (the first 20 ids of the tiny tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, vocab, (length,), generator=g).tolist() for _ in range(n)]


def greedy_request(request_id: str, ids: list[int], max_tokens: int, params=None):
    """A request that runs to ``max_tokens``: greedy unless ``params`` (``SamplingParams``) say otherwise."""
    from services.decoder.engine.request import Request
    from services.decoder.engine.sampling_params import SamplingParams

    params = params or SamplingParams(temperature=0.0, ignore_eos=True)
    return Request(request_id, ids, params, max_tokens, eos_token_ids=frozenset())


def run_to_completion(engine, requests) -> dict[str, list[int]]:
    """Add ``requests``, step until none is left; each request's output token ids."""
    for req in requests:
        engine.add_request(req)
    while engine.has_unfinished:
        engine.step()
    return {req.request_id: list(req.output_token_ids) for req in requests}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], object], repeats: int = 1) -> tuple[float, float | None]:
    """Mean seconds per call of ``fn``: wall clock, and GPU time from CUDA events (None on CPU)."""
    synchronize(device)
    if device == "cuda":
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        end_ev.record()
    synchronize(device)
    wall = (time.perf_counter() - start) / repeats
    gpu = start_ev.elapsed_time(end_ev) / 1e3 / repeats if device == "cuda" else None
    return wall, gpu


def free(device: str) -> None:
    free_memory(device)
