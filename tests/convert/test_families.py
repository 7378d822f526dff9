"""Every model of the README's family table is served: its original-layout checkpoint (the released
``config.json`` with the widths scaled down, random weights; ``tests/support/families.py``) goes
through ``convert``, then the in-process encoder and decoder cores answer one image request (a 2x1
grid and its thumbnail) with exactly the greedy tokens of transformers'
``InternVLForConditionalGeneration.generate`` on the converted checkpoint, fp32 on CPU.

The reference's prompt is the one the original ``chat()`` builds, checked against the converted chat
template; for InternLM2 rows its ids are checked against the SentencePiece model itself. transformers
implements only the v2 pixel shuffle, so for the one ``ps_version`` v1 row (InternVL-Chat-V1-5) the
reference model's shuffle is the original v1 one (``tests/convert/reference.py``): the one part of
that config transformers cannot run.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from services.common.types import TilingParams
from services.convert.converter import convert_checkpoint
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.models.registry import get_family
from services.decoder.types import ChatMessage, DecodeRequest, ImagePlaceholder, TextContent
from services.demo.reference import reference_load_image
from services.encoder.core import ImageInput
from tests.convert.builders import ReferenceInternLM2Tokenizer
from tests.convert.reference import as_rendered, expand_images, pixel_shuffle, reference_chat_prompt
from tests.support.families import FAMILIES, Family
from tests.support.gateway import local_cores
from tests.support.images import png
from tests.support.signing import signed

QUESTION = "Describe the image in detail."
MAX_TOKENS = 8
TOKENS_PER_TILE = 256
STOP = {
    "internlm2-chat": "<|im_end|>",
    "Hermes-2": "<|im_end|>",
    "internvl2_5": "<|im_end|>",
    "phi3-chat": "<|end|>",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_served_with_transformers_tokens(name, family_checkpoint, tmp_path):
    family = FAMILIES[name]
    original = family_checkpoint(name)
    report = convert_checkpoint(original, tmp_path / "native", progress=False)
    assert report.refusals == ()
    _check_converted_config(family, report.dst)
    image = png(896, 448, seed=list(FAMILIES).index(name))
    want, prompt_ids, want_features = _reference(family, original, report.dst, image)
    got, prompt_tokens, features = _served(report.dst, image)
    # The image's features first: a random LLM attends to 768 image tokens almost evenly, so an answer
    # hardly shows their order (ps_version) or scale; the features show both.
    torch.testing.assert_close(features, want_features, rtol=1e-4, atol=1e-4)
    assert len(set(want)) > 1, want  # the model's answer depends on its input, not a constant
    assert prompt_tokens == len(prompt_ids)
    assert got == want


def _check_converted_config(family: Family, native) -> None:
    """What the real config decides survives conversion: vocabulary, image token, shuffle order,
    template, stop token, and the context the decoder serves (its default and bound)."""
    config = json.loads((native / "config.json").read_text())
    text = config["text_config"]
    ids = family.tokenizer.ids()
    assert text["vocab_size"] == family.llm["vocab_size"]
    assert config["image_token_id"] == ids["<IMG_CONTEXT>"]
    assert (config["ps_version"], config["template"]) == (family.ps_version, family.template)
    assert config["vision_config"]["use_qk_norm"] == family.vision["qk_normalization"]
    generation = json.loads((native / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids[STOP[family.template]]
    assert get_family(text).spec(text).context_bound()[0] == family.context


def _reference(family: Family, original, native, image: bytes):
    """transformers' greedy tokens for chat()'s prompt and OpenGVLab's tiling, the prompt's ids, and
    the image's features (tiles * 256, hidden)."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(native, dtype=torch.float32).eval()
    if family.ps_version == "v1":
        model.model.pixel_shuffle = lambda features, scale_factor=0.5: pixel_shuffle(
            features, scale_factor, "v1"
        )
    tokenizer = AutoTokenizer.from_pretrained(native)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_prompt = reference_chat_prompt(family.template, family.system_message, QUESTION, num_images=1)
    assert prompt == as_rendered(chat_prompt)
    pixels = torch.from_numpy(reference_load_image(image, max_num=family.config()["max_dynamic_patch"]))
    assert pixels.shape[0] == 3  # (tiles, 3, 448, 448): 2x1 and the thumbnail
    expanded = expand_images(prompt, [pixels.shape[0]], TOKENS_PER_TILE)
    ids = tokenizer(expanded).input_ids  # special tokens added as chat() adds them (InternLM2: BOS)
    if family.tokenizer.kind == "internlm2":
        added = family.tokenizer.ids() | {"<unk>": 0, "<s>": 1, "</s>": 2}
        sentencepiece = ReferenceInternLM2Tokenizer((original / "tokenizer.model").read_bytes(), added)
        assert ids == sentencepiece.encode(expanded)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output  # (tiles, 256, D)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixels,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    return out[0, input_ids.shape[1] :].tolist(), ids, features.reshape(-1, features.shape[-1])


def _served(native, image: bytes):
    """The mesh's answer: the encoder core embeds the image (its features, inline), the decoder
    frontend generates; the tokens, the prompt's length and the features."""
    request = DecodeRequest(
        messages=[ChatMessage("user", [ImagePlaceholder(), TextContent(QUESTION)])],
        sampling=SamplingParams(temperature=0.0),
        max_tokens=MAX_TOKENS,
    )

    async def ask(cores):
        ctx = signed(request_id="family")
        refs = await cores["encoder"].embed_images(
            [ImageInput(image, TilingParams())], ctx.cache_namespace, inline=True
        )
        tokens, prompt_tokens = [], None
        async for event in cores["frontend"].generate(request, refs, ctx):
            assert event.error is None, event.error
            tokens += event.token_ids
            prompt_tokens = event.prompt_tokens if event.prompt_tokens is not None else prompt_tokens
        return tokens, prompt_tokens, refs[0].tensor.to_torch().reshape(-1, refs[0].dim)

    settings = {"cache": {"num_blocks": 160}, "scheduler": {"max_model_len": 2048}}
    with local_cores(native, **settings) as cores:
        return asyncio.run(ask(cores))
