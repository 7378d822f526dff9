"""Video prompts as each checkpoint writes them: transformers' ``InternVLProcessor`` for a chat template
that renders video parts (``Frame1: <image>``, frames joined by newlines), the reference's ``load_video``
callers otherwise (``Frame-1: <image>\\n`` for InternVL 2.5 / 3 templates, ``Frame1:`` for 2.0-era ones,
or the checkpoint's own ``video_frame_label``), each frame then expanded like an image."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.convert.templates import chat_template_jinja, get_template, render_messages
from services.decoder.prompting import make_prompt_builder

QUESTION = "What happens in the video?"
IMG = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"


def video_message(frames: int, *, image_first: bool = False) -> list[dict]:
    parts = [{"type": "video", "frames": frames}, {"type": "text", "text": QUESTION}]
    if image_first:
        parts.insert(0, {"type": "image"})
    return [{"role": "user", "content": parts}]


def transformers_video_text(tokenizer, frames: int) -> str:
    """transformers' own ``InternVLProcessor.replace_video_token`` for a video of ``frames`` frames."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    processor = SimpleNamespace(
        start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=256
    )
    return InternVLProcessor.replace_video_token(
        processor, {"pixel_values_videos": [torch.zeros(frames, 3, 448, 448)]}, 0
    )


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def without_template(tokenizer, template: str | None = None):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_native_template_frames_are_the_processors(tokenizer):
    builder = make_prompt_builder({}, tokenizer, 256)
    assert builder.frame_style.native and builder.frame_style.label == "Frame{k}: "
    prompt = builder.build(video_message(4), [4], ["v"])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = rendered.replace("<video>", transformers_video_text(tokenizer, 4))
    assert "Frame1: <img>" in expected and "Frame4: <img>" in expected
    assert prompt.token_ids == ids(tokenizer, expected)
    assert [s.length for s in prompt.images] == [256] * 4
    assert [s.content_hash for s in prompt.images] == [f"v#frame{k}" for k in range(4)]


@pytest.mark.parametrize(
    "template, label",
    [("internvl2_5", "Frame-{k}: "), ("internlm2-chat", "Frame{k}: "), ("Hermes-2", "Frame{k}: ")],
)
def test_reference_style_frames_by_conversation_template(tokenizer, template, label):
    """The reference: ``question = ''.join(f'{label}<image>\\n' ...) + question``, then ``chat()``."""
    builder = make_prompt_builder({"template": template}, without_template(tokenizer), 256)
    assert not builder.frame_style.native and builder.frame_style.label == label
    prompt = builder.build(video_message(3), [3], ["v"])
    question = "".join(f"{label.format(k=k + 1)}<IMG_CONTEXT>\n" for k in range(3)) + QUESTION
    text = render_messages(
        get_template(template), [{"role": "user", "content": question}], image_placeholder="<IMG_CONTEXT>"
    )
    expected = ids(tokenizer, text.replace("<IMG_CONTEXT>", IMG))
    assert prompt.token_ids == builder.prefix_ids + expected


def test_converted_checkpoints_template_has_no_video_part_and_gets_the_reference_text(tokenizer):
    jinja = chat_template_jinja("internvl2_5", "sys", image_placeholder="<IMG_CONTEXT>")
    builder = make_prompt_builder({"template": "internvl2_5"}, without_template(tokenizer, jinja), 256)
    assert not builder.frame_style.native and builder.frame_style.label == "Frame-{k}: "
    got = builder.build(video_message(2), [2], ["v"]).token_ids
    text = "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nFrame-1: {i}\nFrame-2: {i}\n{q}<|im_end|>\n"
    expected = ids(tokenizer, text.format(i=IMG, q=QUESTION) + "<|im_start|>assistant\n")
    assert got == expected


def test_the_checkpoint_may_name_its_own_label(tokenizer):
    config = {"template": "internvl2_5", "video_frame_label": "Frame {k}: "}
    builder = make_prompt_builder(config, without_template(tokenizer), 256)
    assert builder.frame_style.label == "Frame {k}: "
    with pytest.raises(FailedPrecondition):
        make_prompt_builder({"video_frame_label": "Frame: "}, tokenizer, 256)


def test_tiles_per_frame_rows_and_mixed_images(tokenizer):
    builder = make_prompt_builder({}, tokenizer, 256)
    prompt = builder.build(video_message(2, image_first=True), [3, 6], ["i", "v"])
    assert [s.length for s in prompt.images] == [3 * 256, 3 * 256, 3 * 256]
    assert prompt.sources == [(0, 0), (1, 0), (1, 3 * 256)]
    image, video = torch.randn(3 * 256, 4), torch.randn(6 * 256, 4)
    rows = prompt.embeddings_for([image, video])
    assert torch.equal(rows[0], image) and torch.equal(torch.cat(rows[1:]), video)
    assert builder.count_tokens(video_message(2, image_first=True), [3, 6]) == (
        len(prompt.token_ids),
        9 * 256,
    )


@pytest.mark.parametrize(
    "messages, tiles",
    [
        (video_message(3), [4]),  # 4 tiles are not 3 frames of equal tiles
        (video_message(2), []),
        ([{"role": "user", "content": [{"type": "video", "frames": 0}]}], [1]),
        ([{"role": "user", "content": [{"type": "video"}]}], [1]),
    ],
)
def test_inconsistent_videos_are_invalid(tokenizer, messages, tiles):
    with pytest.raises(InvalidArgument):
        make_prompt_builder({}, tokenizer, 256).build(messages, tiles, ["v"] * len(tiles))
