"""Qwen3 dense (the language models of InternVL3.5) in the decoder: per-head q/k norms, no q/k/v bias,
an explicit head_dim (24 here, against hidden / heads = 16). Greedy fp32 tokens equal transformers'
``InternVLForConditionalGeneration.generate`` alone, in a batch and over two tensor-parallel ranks (each
holds the whole per-head norm); mixture-of-experts language models
(``qwen3_moe``, ``gpt_oss``) are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.models.registry import get_family
from tests.decoder.helpers import CASES, Reference, make_config, make_input, run, tokens_of


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("decoder-qwen3"), llm="qwen3", seed=1)


@pytest.fixture(scope="module")
def qwen3_reference(qwen3_ckpt):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(qwen3_ckpt, dtype=torch.float32).eval()
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    return Reference(model, AutoTokenizer.from_pretrained(qwen3_ckpt))


def test_spec_reads_qwen3_config(qwen3_ckpt):
    text = Checkpoint.open(qwen3_ckpt).text_config
    spec = get_family(text).spec(text)
    assert (spec.family, spec.head_dim, spec.hidden_size // spec.num_heads) == ("qwen3", 24, 16)
    assert spec.qk_norm and not spec.qkv_bias and not spec.o_bias and spec.sliding_window is None


def test_qwen3_greedy_tokens_match_transformers(qwen3_ckpt, qwen3_reference):
    cases = CASES[:2]  # an image request and a text-only one
    eng = LLMEngine(make_config(qwen3_ckpt, scheduler={"max_num_batched_tokens": 96}))
    try:
        alone = run(eng, [make_input("alone", cases[0], qwen3_reference)])["alone"]
        batch = run(eng, [make_input(f"b{i}", c, qwen3_reference) for i, c in enumerate(cases)], [0, 3])
    finally:
        eng.shutdown()
    want = qwen3_reference.generate(cases[0])
    assert len(set(want)) > 1, want
    assert tokens_of(alone) == want
    for i, case in enumerate(cases):
        assert tokens_of(batch[f"b{i}"]) == qwen3_reference.generate(case), f"request {i}"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_mixture_of_experts_is_refused_by_name(qwen3_ckpt, tmp_path, model_type):
    ckpt = shutil.copytree(qwen3_ckpt, tmp_path / model_type)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["model_type"] = model_type
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(FailedPrecondition) as err:
        LLMEngine(make_config(ckpt))
    assert f"{model_type!r}" in str(err.value)
    assert "mixture-of-experts layers are not supported by the decoder" in str(err.value)


@pytest.mark.slow
def test_qwen3_tensor_parallel_two_ranks(qwen3_ckpt, qwen3_reference):
    case = CASES[0]
    eng = LLMEngine(make_config(qwen3_ckpt, parallel={"tensor_parallel_size": 2}))
    try:
        events = run(eng, [make_input("tp", case, qwen3_reference)])["tp"]
    finally:
        eng.shutdown()
    assert tokens_of(events) == qwen3_reference.generate(case)
