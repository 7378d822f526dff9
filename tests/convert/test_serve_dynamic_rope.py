"""InternVL2-8B / 26B's path: an InternLM2 LLM with dynamic NTK rope scaling, converted to the Llama
layout (``rope_type: dynamic``), is served by the decoder with the original model's tokens for a
prompt whose total length reaches ``max_position_embeddings`` exactly (below it, InternLM2's dynamic
NTK is the plain rope); the context defaults to that length."""

from __future__ import annotations

import json

import torch

from services.convert.converter import convert_checkpoint
from tests.convert.builders import VIT_300M, build_original_checkpoint
from tests.convert.reference import expand_images, reference_chat_prompt
from tests.convert.serving import engine_greedy

QUESTION = "Describe the image in detail."
MAX_TOKENS = 8


def test_converted_dynamic_ntk_internlm2_is_served_up_to_its_positions(tmp_path):
    original = build_original_checkpoint(
        tmp_path / "original", vit=VIT_300M, rope_scaling={"type": "dynamic", "factor": 2.0}, seed=6
    )
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    prompt = reference_chat_prompt(original.template, original.system_message, QUESTION, num_images=1)
    ids = original.reference_tokenizer.encode(expand_images(prompt, [1], original.tokens_per_tile))
    bound = len(ids) + MAX_TOKENS
    config_path = original.path / "config.json"
    config = json.loads(config_path.read_text())
    config["llm_config"]["max_position_embeddings"] = bound
    config_path.write_text(json.dumps(config))
    report = convert_checkpoint(original.path, tmp_path / "native", progress=False)
    text = json.loads((report.dst / "config.json").read_text())["text_config"]
    assert text["rope_parameters"]["rope_type"] == "dynamic"

    want = original.model.greedy(ids, pixels, original.image_token_id, max_new_tokens=MAX_TOKENS)
    assert len(set(want)) > 1, want
    got, max_model_len = engine_greedy(report.dst, original, pixels, QUESTION, ids, MAX_TOKENS)
    assert max_model_len == bound
    assert got == want
