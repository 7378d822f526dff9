"""Qwen2- and Phi-3-based original checkpoints (InternVL2-1B/4B, 2.5, 3): LLM and tokenizer carried over."""

from __future__ import annotations

import json

import pytest
import torch

from services.convert.converter import convert_checkpoint
from tests.convert.builders import VIT_300M, build_original_checkpoint
from tests.convert.reference import as_rendered, expand_images, reference_chat_prompt
from tests.convert.serving import hf_greedy

VARIANTS = {
    "qwen2-internvl2_5": dict(llm="qwen2", template="internvl2_5"),
    "phi3-phi3-chat": dict(llm="phi3", template="phi3-chat"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    root = tmp_path_factory.mktemp(request.param)
    original = build_original_checkpoint(
        root / "original", vit=VIT_300M, ps_version="v2", **VARIANTS[request.param]
    )
    report = convert_checkpoint(original.path, root / "native", progress=False)
    model = InternVLForConditionalGeneration.from_pretrained(report.dst).eval()
    tokenizer = AutoTokenizer.from_pretrained(report.dst)
    source_tokenizer = AutoTokenizer.from_pretrained(original.path)
    return original, report, model, tokenizer, source_tokenizer


def test_config_and_tokenizer_attributes(converted):
    original, report, _, tokenizer, _ = converted
    config = json.loads((report.dst / "config.json").read_text())
    assert config["text_config"]["model_type"] == original.model.language_model.inner.config.model_type
    assert (config["ps_version"], config["template"]) == ("v2", original.template)
    assert tokenizer.start_image_token == "<img>" and tokenizer.end_image_token == "</img>"
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    assert tokenizer.context_image_token_id == original.image_token_id == config["image_token_id"]
    generation = json.loads((report.dst / "generation_config.json").read_text())
    stop = "<|end|>" if original.template == "phi3-chat" else "<|im_end|>"
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(stop)


def test_prompt_ids_and_greedy_tokens_match_chat(converted):
    original, _, model, tokenizer, source_tokenizer = converted
    pixels = torch.randn(
        1, 3, original.vit.image_size, original.vit.image_size, generator=torch.Generator().manual_seed(3)
    )
    question = "Describe the image in detail."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == as_rendered(
        reference_chat_prompt(original.template, original.system_message, question, num_images=1)
    )

    expanded = expand_images(prompt, [1], original.tokens_per_tile)
    ids = tokenizer(expanded).input_ids
    assert ids == source_tokenizer(expanded).input_ids

    with torch.no_grad():
        got = model.get_image_features(pixel_values=pixels).pooler_output
    assert (got - original.model.extract_feature(pixels)).abs().max().item() <= 1e-5

    want = original.model.greedy(ids, pixels, original.image_token_id, max_new_tokens=6)
    assert hf_greedy(model, ids, pixels, 6) == want
    assert len(set(want)) > 1, want
