"""The rebuilt InternLM2 tokenizer encodes exactly as the SentencePiece original (``InternLM2Tokenizer``)."""

from __future__ import annotations

import random

import pytest

from services.convert.tokenizer import IMAGE_TOKENS, build_internlm2_tokenizer
from tests.convert.builders import CORPUS, INTERNVL_ADDED, write_internlm2_tokenizer

ALPHABET = list("Helo wrdthiscnypfuqkbxjmvgaz,.?!  \t\n0123456789图像描述猫垫子") + [
    "<|im_end|>",
    "<|im_start|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "😀",
    "é",
    "ﬁ",  # NFKC folds this ligature: exercises the charsmap where the model has one
    "\u3000",
    "▁",
    "<s>",
]


@pytest.mark.parametrize("internlm2_style", [True, False], ids=["internlm2-identity", "nfkc-dummy-prefix"])
def test_ids_equal_sentencepiece(tmp_path, internlm2_style):
    reference = write_internlm2_tokenizer(tmp_path, internlm2_style=internlm2_style)
    fast = build_internlm2_tokenizer(tmp_path)
    rng = random.Random(0)
    samples = list(CORPUS) + ["", " ", "  leading", "trailing  ", "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHi"]
    samples += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(600)]
    for text in samples:
        assert fast(text).input_ids == reference.encode(text), repr(text)
        assert fast(text, add_special_tokens=False).input_ids == reference.encode(text, add_bos=False), repr(
            text
        )


def test_special_tokens_and_image_attributes(tmp_path):
    reference = write_internlm2_tokenizer(tmp_path)
    fast = build_internlm2_tokenizer(tmp_path)
    assert (fast.bos_token, fast.eos_token, fast.unk_token) == ("<s>", "</s>", "<unk>")
    for token, token_id in reference.added.items():
        assert fast.convert_tokens_to_ids(token) == token_id
    for attribute, token in IMAGE_TOKENS.items():
        assert getattr(fast, attribute) == token
        assert getattr(fast, f"{attribute}_id") == reference.added[token]
    assert (
        len(fast) == max(reference.added.values()) + 1 == reference.sp.get_piece_size() + len(INTERNVL_ADDED)
    )
    text = "Hello world, 图像<|im_end|>"
    assert fast.decode(fast(text, add_special_tokens=False).input_ids) == text
