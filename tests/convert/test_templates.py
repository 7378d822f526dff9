"""Chat templates rendered by transformers' Jinja reproduce the reference ``chat()`` prompt strings."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from services.common.errors import InvalidArgument
from services.convert.templates import chat_template_jinja, get_template, render_messages, template_names
from tests.convert.reference import REFERENCE_TEMPLATES, reference_chat_prompt

TEMPLATES = ["internlm2-chat", "Hermes-2", "phi3-chat", "internvl2_5"]
SYSTEM = 'Checkpoint system message: 书生 😀 "quoted" \\ back\nslash'
QUESTION = "What is in the picture?"


def _render(template: str, messages, system=SYSTEM, add_generation_prompt=True) -> str:
    """What ``AutoTokenizer.apply_chat_template(..., tokenize=False)`` renders."""
    jinja = chat_template_jinja(template, system)
    rendered = render_jinja_template(
        conversations=[messages], chat_template=jinja, add_generation_prompt=add_generation_prompt
    )
    return rendered[0][0] if isinstance(rendered[0], list) else rendered[0]


def _user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE = {"type": "image"}


def _text(t):
    return {"type": "text", "text": t}


@pytest.mark.parametrize("template", TEMPLATES)
def test_text_only(template):
    want = reference_chat_prompt(template, SYSTEM, QUESTION)
    assert _render(template, [{"role": "user", "content": QUESTION}]) == want
    assert _render(template, [_user(_text(QUESTION))]) == want


@pytest.mark.parametrize("template", TEMPLATES)
def test_one_image_prepends_placeholder_line(template):
    want = reference_chat_prompt(template, SYSTEM, QUESTION, num_images=1)
    assert "<image>\n" + QUESTION in want
    assert _render(template, [_user(IMAGE, _text(QUESTION))]) == want


@pytest.mark.parametrize("template", TEMPLATES)
def test_several_images_are_numbered(template):
    question = "Image-1: <image>\nImage-2: <image>\n" + QUESTION  # the reference's multi-image prompt
    want = reference_chat_prompt(template, SYSTEM, question, num_images=2)
    assert _render(template, [_user(IMAGE, IMAGE, _text(QUESTION))]) == want


@pytest.mark.parametrize("template", TEMPLATES)
def test_multi_turn_and_system_override(template):
    history = [("<image>\nFirst question?", "First answer."), ("Second?", "Second answer.")]
    want = reference_chat_prompt(template, "Per-request system.", QUESTION, history=history, num_images=1)
    messages = [
        {"role": "system", "content": "Per-request system."},
        _user(IMAGE, _text("First question?")),
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": [_text("Second answer.")]},
        {"role": "user", "content": QUESTION},
    ]
    assert _render(template, messages) == want
    assert render_messages(get_template(template), messages) == want


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_data_matches_conversation_py(template):
    system_template, roles, sep = REFERENCE_TEMPLATES[template]
    t = get_template(template)
    assert (t.system_template, t.roles, t.separator) == (system_template, roles, sep)
    assert t.stop_str == sep.strip() and t.stop_str in ("<|im_end|>", "<|end|>")
    # The default system message is the template's own; the checkpoint's replaces it in the Jinja.
    assert t.system_message in _render(template, [{"role": "user", "content": "x"}], system=None)


def test_empty_system_message_still_renders_the_system_block():
    got = _render("internvl2_5", [{"role": "user", "content": "hi"}], system="")
    assert got == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_template_and_role_are_rejected():
    assert set(TEMPLATES) == set(template_names())
    with pytest.raises(InvalidArgument, match="unknown InternVL conversation template"):
        get_template("vicuna_v1.1")
    with pytest.raises(Exception, match="unsupported role"):
        _render("internvl2_5", [{"role": "tool", "content": "x"}])
