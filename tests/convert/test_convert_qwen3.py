"""InternVL3.5 original checkpoints (``Qwen3ForCausalLM``): the dense LLM passes through the converter
(per-head ``q_norm`` / ``k_norm``, an explicit ``head_dim``) and the mesh's decoder serves the result
with the tokens the original model computes for ``chat()``'s prompt. Mixture-of-experts LLMs are
refused by name, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.convert.converter import convert_checkpoint
from tests.convert.builders import VIT_300M, build_original_checkpoint
from tests.convert.reference import expand_images, reference_chat_prompt
from tests.convert.serving import engine_greedy, hf_greedy

QUESTION = "Describe the image in detail."


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    original = build_original_checkpoint(
        root / "original", llm="qwen3", vit=VIT_300M, ps_version="v2", template="internvl2_5", seed=3
    )
    report = convert_checkpoint(original.path, root / "native", progress=False)
    pixels = torch.randn(
        1, 3, original.vit.image_size, original.vit.image_size, generator=torch.Generator().manual_seed(4)
    )
    return original, report, pixels


def _reference(original, pixels, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """chat()'s prompt ids through the source tokenizer, and the original model's greedy tokens."""
    from transformers import AutoTokenizer

    prompt = reference_chat_prompt(original.template, original.system_message, QUESTION, num_images=1)
    expanded = expand_images(prompt, [1], original.tokens_per_tile)
    ids = AutoTokenizer.from_pretrained(original.path)(expanded).input_ids
    return ids, original.model.greedy(ids, pixels, original.image_token_id, max_new_tokens=max_new_tokens)


def test_qwen3_config_and_weights_pass_through(converted):
    original, report, _ = converted
    config = json.loads((report.dst / "config.json").read_text())
    text = config["text_config"]
    assert (report.llm_architecture, report.native_text_model_type) == ("Qwen3ForCausalLM", "qwen3")
    assert (text["model_type"], text["head_dim"], text["attention_bias"]) == ("qwen3", 12, False)
    index = json.loads((report.dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.layers.1.self_attn.k_norm.weight" in index


def test_transformers_loads_the_converted_qwen3_like_the_original(converted):
    from transformers import InternVLForConditionalGeneration

    original, report, pixels = converted
    model = InternVLForConditionalGeneration.from_pretrained(report.dst).eval()
    ids, want = _reference(original, pixels, 6)
    assert hf_greedy(model, ids, pixels, 6) == want
    assert len(set(want)) > 1, want


def test_decoder_serves_the_converted_qwen3_like_the_original(converted):
    original, report, pixels = converted
    ids, want = _reference(original, pixels, 6)
    got, _ = engine_greedy(report.dst, original, pixels, QUESTION, ids, 6)
    assert got == want


@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_mixture_of_experts_llms_are_refused(converted, tmp_path, architecture):
    original, _, _ = converted
    src = tmp_path / "original"
    src.mkdir()
    for f in original.path.iterdir():
        (src / f.name).symlink_to(f)
    config = json.loads((original.path / "config.json").read_text())
    config["llm_config"]["architectures"] = [architecture]
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(FailedPrecondition) as err:
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert repr(architecture) in str(err.value)
    assert "mixture-of-experts layers are not supported by the decoder" in str(err.value)
    assert not (tmp_path / "out").exists()
