"""Running a converted checkpoint the two ways the converter tests compare with the original model:
the mesh's engine (with the original's image features) and transformers' ``generate``, greedy."""

from __future__ import annotations

from pathlib import Path

import torch


def engine_greedy(
    dst: Path, original, pixels: torch.Tensor, question: str, ids: list[int], max_tokens: int
) -> tuple[list[int], int]:
    """The engine's greedy tokens for one image + ``question`` on the converted checkpoint ``dst`` (its
    prompt must tokenize to ``ids``), and the engine's context length."""
    from services.decoder.config import CacheConfig, DecoderConfig
    from services.decoder.engine.llm_engine import LLMEngine
    from services.decoder.engine.sampling_params import SamplingParams
    from services.decoder.types import GenerateInput, ImageEmbedding

    features = original.model.extract_feature(pixels)  # (tiles, tokens, hidden)
    inp = GenerateInput(
        request_id="converted",
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        images=[ImageEmbedding(features.reshape(-1, features.shape[-1]), 1, "converted-image")],
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )
    engine = LLMEngine(DecoderConfig(model=str(dst), dtype="float32", cache=CacheConfig(num_blocks=64)))
    try:
        request = engine.make_request(inp)
        assert request.prompt_token_ids == ids
        engine.add_request(request)
        got = []
        while engine.has_unfinished:
            got += [t for event in engine.step() for t in event.token_ids]
        return got, engine.max_model_len
    finally:
        engine.shutdown()


def hf_greedy(model, ids: list[int], pixels: torch.Tensor, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` (no EOS stop)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(ids) :].tolist()
