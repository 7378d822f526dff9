import hashlib

import pytest
import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from services.common.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_loads_in_transformers_and_gives_256_rows_per_tile(tiny_checkpoint):
    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    pixel_values = torch.randn(3, 3, 448, 448)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert feats.shape == (3, 256, model.config.text_config.hidden_size)
    assert model.config.image_seq_length == 256


def test_tokenizer_has_the_internvl_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.start_image_token == "<img>"
    assert tokenizer.end_image_token == "</img>"
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    for tok in ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"]:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == tok
    assert tokenizer.eos_token == "<|im_end|>"


def test_chat_template_renders_one_placeholder_per_image_part(tokenizer):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.count("<IMG_CONTEXT>") == 3
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>\n<|im_start|>user" in prompt


def test_some_tokens_split_a_multibyte_character(tokenizer):
    text = "鑫淼犇"  # characters absent from the training corpus: byte-level pieces
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), pieces
    assert tokenizer.decode(ids) == text


def test_chinese_words_from_the_corpus_are_single_tokens(tokenizer):
    assert len(tokenizer.encode("熊猫", add_special_tokens=False)) == 1


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(), train_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_same_seed_same_weights_llama_variant(tmp_path):
    p1 = make_tiny_checkpoint(tmp_path / "a", seed=3, llm="llama")
    p2 = make_tiny_checkpoint(tmp_path / "b", seed=3, llm="llama")
    digest = [hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for p in (p1, p2)]
    assert digest[0] == digest[1]
    model = InternVLForConditionalGeneration.from_pretrained(p1)
    assert model.config.text_config.model_type == "llama"
