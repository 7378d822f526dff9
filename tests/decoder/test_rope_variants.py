"""Rope variants that change with the sequence length are served exactly up to the length where they
equal a static rope, and refused past it.

Dynamic NTK (InternLM2.5 / InternLM2 of InternVL2-8B / 26B, in the Llama layout) is the plain rope up
to ``max_position_embeddings``; Phi-3's longrope (Mini-InternVL-Chat-4B-V1-5, InternVL2-4B) uses its
short factors and its attention factor up to ``original_max_position_embeddings``. Tiny checkpoints
with a 64-token bound: greedy fp32 tokens equal transformers' ``generate`` for prompts whose total
length reaches the bound exactly; a ``max_model_len`` past the bound is refused with both numbers; an
unset one defaults to the bound.
"""

from __future__ import annotations

import logging

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.decoder.engine.llm_engine import LLMEngine
from tests.decoder.helpers import Case, Reference, make_config, make_input, run, tokens_of, user

BOUND = 64
# A small theta makes the rotations turn fast enough that a wrong frequency shows in 64 positions.
VARIANTS = {
    "dynamic": (
        "llama",
        {
            "max_position_embeddings": BOUND,
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0},
        },
    ),
    "longrope": (
        "phi3",
        {
            "max_position_embeddings": 4 * BOUND,  # attention factor sqrt(1 + ln 4 / ln 64)
            "original_max_position_embeddings": BOUND,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 100.0,
                # head_dim 16 -> 8 factors each
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                "long_factor": [4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0],
            },
        },
    ),
}


def _cases() -> list[Case]:
    story = user("Tell me a story about the sea.")  # 49 prompt tokens
    brief = [{"role": "system", "content": "Be brief."}] + user("写一首关于春天的诗")
    return [Case(story, [], BOUND - 49), Case(story, [], BOUND - 50), Case(brief, [], 12)]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from services.common.tiny_checkpoint import make_tiny_checkpoint

    llm, overrides = VARIANTS[request.param]
    ckpt = make_tiny_checkpoint(
        tmp_path_factory.mktemp(f"rope-{request.param}"), llm=llm, seed=5, text_overrides=overrides
    )
    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert model.config.text_config.rope_parameters["rope_type"] == request.param
    return request.param, ckpt, Reference(model, AutoTokenizer.from_pretrained(ckpt))


def test_greedy_tokens_match_transformers_up_to_the_bound(variant):
    _, ckpt, reference = variant
    cases = _cases()
    assert len(reference.prompt_ids(cases[0])) + cases[0].max_tokens == BOUND
    eng = LLMEngine(make_config(ckpt, scheduler={"max_model_len": BOUND, "max_num_batched_tokens": 32}))
    try:
        alone = run(eng, [make_input("alone", cases[0], reference)])["alone"]
        batch = run(eng, [make_input(f"b{i}", c, reference) for i, c in enumerate(cases)], arrivals=[0, 2, 3])
    finally:
        eng.shutdown()
    want = reference.generate(cases[0])
    assert len(want) == cases[0].max_tokens and len(set(want)) > 1  # runs to the bound, not a constant
    assert tokens_of(alone) == want
    for i, case in enumerate(cases):
        assert tokens_of(batch[f"b{i}"]) == reference.generate(case), f"request {i}"


def test_max_model_len_past_the_bound_is_refused(variant):
    name, ckpt, _ = variant
    key = "original_max_position_embeddings" if name == "longrope" else "max_position_embeddings"
    with pytest.raises(FailedPrecondition) as err:
        LLMEngine(make_config(ckpt, scheduler={"max_model_len": BOUND + 1}))
    message = str(err.value)
    assert f"scheduler.max_model_len={BOUND + 1}" in message
    assert f"{key}={BOUND}" in message and f"scheduler.max_model_len <= {BOUND}" in message
    assert repr(name) in message


def test_unset_max_model_len_defaults_to_the_bound(variant, caplog):
    _, ckpt, _ = variant
    with caplog.at_level(logging.INFO, logger="services.decoder.engine.model_runner"):
        eng = LLMEngine(make_config(ckpt, scheduler={"max_model_len": None}))
    try:
        assert eng.max_model_len == BOUND
        assert eng.config.scheduler.max_model_len == BOUND
    finally:
        eng.shutdown()
    defaults = [r.getMessage() for r in caplog.records if "defaults to" in r.getMessage()]
    assert len(defaults) == 1 and f"defaults to {BOUND}" in defaults[0], defaults
