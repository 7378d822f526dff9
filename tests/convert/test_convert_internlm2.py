"""InternLM2-based original checkpoints (InternVL 1.5, InternVL2-2B/8B/26B) through the converter.

The converted checkpoint is loaded with transformers' own classes and compared with the in-test
implementation of the original modules: image embeddings (fp32, ≤ 1e-5), greedy tokens, prompt ids.
"""

from __future__ import annotations

import json

import pytest
import torch

from services.convert.converter import convert_checkpoint
from tests.convert.builders import VIT_6B, VIT_300M, build_original_checkpoint
from tests.convert.reference import as_rendered, expand_images, pixel_shuffle, reference_chat_prompt

VARIANTS = {
    # InternVL 1.5 (InternViT-6B flags, v1 shuffle), safetensors in two shards, linear rope scaling.
    "6b-v1": dict(vit=VIT_6B, ps_version="v1", shards=2, rope_scaling={"type": "linear", "factor": 2.0}),
    # InternVL 2.0 (InternViT-300M flags, v2 shuffle), .bin shards.
    "300m-v2-bin": dict(vit=VIT_300M, ps_version="v2", shards=2, weight_format="bin"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    root = tmp_path_factory.mktemp(f"internlm2-{request.param}")
    original = build_original_checkpoint(root / "original", **VARIANTS[request.param])
    report = convert_checkpoint(original.path, root / "native", progress=False)
    model = InternVLForConditionalGeneration.from_pretrained(report.dst).eval()
    tokenizer = AutoTokenizer.from_pretrained(report.dst)
    return original, report, model, tokenizer


def _pixels(tiles: int, size: int, seed: int = 1):
    return torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


def native_image_features(model, pixel_values, ps_version: str):
    """The converted model's image embeddings, with the pixel shuffle the checkpoint declares.

    transformers implements only v2; for v1 its vision tower and projector are used around the v1
    shuffle, which is what the mesh's encoder does with a ``ps_version: v1`` checkpoint.
    """
    with torch.no_grad():
        if ps_version == "v2":
            return model.get_image_features(pixel_values=pixel_values).pooler_output
        hidden = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        shuffled = pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), 0.5, "v1")
        return model.model.multi_modal_projector(shuffled.reshape(hidden.shape[0], -1, shuffled.shape[-1]))


def test_layout_matches_save_pretrained(converted):
    original, report, model, _ = converted
    files = {p.name for p in report.dst.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert {"generation_config.json", "preprocessor_config.json"} <= files
    index = json.loads((report.dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert "language_model.lm_head.weight" in index["weight_map"]
    assert any(k.endswith("self_attn.q_proj.weight") for k in index["weight_map"])
    assert report.dtype == "float32" and model.dtype == torch.float32
    assert report.system_message_source.startswith("conversation.py")


def test_config_records_ps_version_and_template_and_survives_round_trip(converted, tmp_path):
    original, report, model, _ = converted
    config = json.loads((report.dst / "config.json").read_text())
    assert config["ps_version"] == original.ps_version
    assert config["template"] == "internlm2-chat"
    assert config["vision_feature_layer"] == -1
    assert config["image_token_id"] == original.image_token_id
    assert config["image_seq_length"] == original.tokens_per_tile
    assert config["text_config"]["model_type"] == "llama"
    # transformers keeps the extra keys through from_pretrained → save_pretrained.
    assert model.config.ps_version == original.ps_version and model.config.template == "internlm2-chat"
    model.config.save_pretrained(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    assert again["ps_version"] == original.ps_version and again["template"] == "internlm2-chat"


def test_image_embeddings_match_the_original_modules(converted):
    original, _, model, _ = converted
    pixels = _pixels(3, original.vit.image_size)
    expected = original.model.extract_feature(pixels)
    got = native_image_features(model, pixels, original.ps_version)
    assert got.shape == expected.shape == (3, original.tokens_per_tile, 32)
    assert (got - expected).abs().max().item() <= 1e-5
    if original.ps_version == "v1":
        # Teeth: transformers' own (v2) path gives different embeddings for a v1 checkpoint.
        v2 = native_image_features(model, pixels, "v2")
        assert (v2 - expected).abs().max().item() > 1e-3


def test_prompt_ids_and_greedy_tokens_match_chat(converted):
    original, _, model, tokenizer = converted
    tiles = 2
    pixels = _pixels(tiles, original.vit.image_size, seed=2)
    question = "Describe the image in detail."

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = reference_chat_prompt("internlm2-chat", original.system_message, question, num_images=1)
    assert prompt == as_rendered(reference)

    expanded = expand_images(prompt, [tiles], original.tokens_per_tile)
    ids = tokenizer(expanded, add_special_tokens=True).input_ids
    assert ids == original.reference_tokenizer.encode(expanded)

    want = original.model.greedy(ids, pixels, original.image_token_id, max_new_tokens=6)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        if original.ps_version == "v2":
            out = model.generate(
                input_ids=input_ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, eos_token_id=None
            )
            got = out[0, len(ids) :].tolist()
        else:
            embeds = model.get_input_embeddings()(input_ids).clone()
            features = native_image_features(model, pixels, "v1").reshape(-1, embeds.shape[-1])
            embeds[input_ids == original.image_token_id] = features
            out = model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
            )
            got = out[0].tolist()
    assert got == want
    assert len(set(want)) > 1, want  # a degenerate model would make the comparison toothless
