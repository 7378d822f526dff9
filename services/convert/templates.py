"""InternVL conversation templates as data, and their rendering as a Jinja chat template.

Original-format InternVL checkpoints name a conversation template (``config.json`` → ``template``) and
build prompts in Python (``conversation.py``, ``Conversation.get_prompt`` with the MPT separator style,
called from ``InternVLChatModel.chat``). Transformers-native checkpoints carry a Jinja chat template in
the tokenizer instead. This module holds the templates InternVL 1.5 / 2 / 2.5 / 3 use, renders a
prompt exactly as the reference does (``ConversationTemplate.render``), and emits the equivalent Jinja
source (``chat_template_jinja``) so that ``AutoTokenizer.apply_chat_template`` reproduces the reference
prompt string.

Image convention: a content part ``{"type": "image"}`` renders an image placeholder followed by a newline,
which is what ``chat()`` prepends to the first question when it is given pixel values and the question
has no placeholder. Several images in one message render as ``Image-1: <ph>`` newline ``Image-2: <ph>``
newline, the reference's multi-image convention. The placeholder is a parameter: ``<image>`` (the
default, the reference's own text) or ``<IMG_CONTEXT>``, which the converter writes into converted
checkpoints (transformers' -hf convention). The decoder then replaces each ``<IMG_CONTEXT>`` with
``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>`` in order, as ``chat()``
replaces each ``<image>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from services.common.errors import InvalidArgument

IMAGE_PLACEHOLDER = "<image>"
# What converted checkpoints render for an image part (transformers' -hf convention).
CONTEXT_PLACEHOLDER = "<IMG_CONTEXT>"


@dataclass(frozen=True)
class ConversationTemplate:
    """One MPT-style conversation template (the only style InternVL chat checkpoints use).

    ``render`` follows ``Conversation.get_prompt`` for ``SeparatorStyle.MPT``: the system block is always
    emitted (even with an empty system message), every turn is ``role + message + separator``, and a
    turn whose message is empty or missing renders as the bare role (the generation prompt).
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    separator: str

    @property
    def stop_str(self) -> str:
        """The text whose token ends generation: the separator without trailing whitespace.

        ``chat()`` looks the separator up as one token (``<|im_end|>``, ``<|end|>``); InternVL 2.5's
        separator carries a newline, which its ``chat()`` strips before the lookup.
        """
        return self.separator.strip()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop_str,)

    def with_system_message(self, system_message: str) -> ConversationTemplate:
        return replace(self, system_message=system_message)

    def render(
        self,
        turns: Sequence[tuple[str, str | None]],
        system_message: str | None = None,
    ) -> str:
        """The reference prompt for ``turns`` = [(role, message)], role in ``("user", "assistant")``.

        Pass ``("assistant", None)`` last for a generation prompt, as ``chat()`` does.
        """
        system = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=system) + self.separator
        for role, message in turns:
            prefix = self._role_prefix(role)
            out += prefix + message + self.separator if message else prefix
        return out

    def _role_prefix(self, role: str) -> str:
        if role == "user":
            return self.roles[0]
        if role == "assistant":
            return self.roles[1]
        raise InvalidArgument(f"role must be 'user' or 'assistant', got {role!r}")


# Defaults as the reference ``conversation.py`` defines them. A checkpoint may ship its own system
# message (see ``services.convert.original.read_system_message``); converters prefer that one.
_LEGACY_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_V25_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

_CHATML_SYSTEM = "<|im_start|>system\n{system_message}"
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        ConversationTemplate("Hermes-2", _CHATML_SYSTEM, _LEGACY_SYSTEM, _CHATML_ROLES, "<|im_end|>"),
        ConversationTemplate("internlm2-chat", _CHATML_SYSTEM, _LEGACY_SYSTEM, _CHATML_ROLES, "<|im_end|>"),
        ConversationTemplate(
            "phi3-chat",
            "<|system|>\n{system_message}",
            _LEGACY_SYSTEM,
            ("<|user|>\n", "<|assistant|>\n"),
            "<|end|>",
        ),
        ConversationTemplate("internvl2_5", _CHATML_SYSTEM, _V25_SYSTEM, _CHATML_ROLES, "<|im_end|>\n"),
    )
}


def template_names() -> tuple[str, ...]:
    return tuple(_TEMPLATES)


def get_template(name: str) -> ConversationTemplate:
    """The template registered under ``name`` (the checkpoint's ``template`` field)."""
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown InternVL conversation template {name!r}; supported: {', '.join(_TEMPLATES)}",
            reason="unknown_template",
        ) from None


def render_messages(
    template: ConversationTemplate,
    messages: Sequence[Mapping],
    add_generation_prompt: bool = True,
    image_placeholder: str = IMAGE_PLACEHOLDER,
) -> str:
    """Python twin of the Jinja template: OpenAI-style messages → the reference prompt string."""
    system = None
    if messages and messages[0].get("role") == "system":
        system = _content_text(messages[0].get("content"), image_placeholder)
        messages = messages[1:]
    turns = [(m.get("role"), _content_text(m.get("content"), image_placeholder)) for m in messages]
    if add_generation_prompt:
        turns.append(("assistant", None))
    return template.render(turns, system_message=system)


def _content_text(content, image_placeholder: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    n_images = sum(1 for part in content if part.get("type") == "image")
    out, k = "", 0
    for part in content:
        if part.get("type") == "image":
            k += 1
            out += f"{image_placeholder}\n" if n_images == 1 else f"Image-{k}: {image_placeholder}\n"
        elif part.get("type") == "text":
            out += part.get("text", "")
        else:
            raise InvalidArgument(f"unsupported content part type {part.get('type')!r}")
    return out


def _lit(text: str) -> str:
    """A Jinja string literal for ``text``.

    JSON escaping is valid Jinja escaping (``\\n``, ``\\"``, ``\\\\``); ``ensure_ascii=False`` keeps
    characters outside the BMP intact (Jinja would split a JSON surrogate pair into two code points).
    """
    return json.dumps(text, ensure_ascii=False)


def chat_template_jinja(
    name: str,
    system_message: str | None = None,
    image_placeholder: str = IMAGE_PLACEHOLDER,
) -> str:
    """Jinja source reproducing ``chat()``'s prompt for template ``name``.

    ``system_message`` is the checkpoint's default (``None``: the template's built-in one); a leading
    ``system`` message overrides it per request. The rendered string carries no BOS token: tokenising
    it with ``add_special_tokens=True`` gives the ids ``chat()`` feeds the model.
    """
    t = get_template(name)
    system = t.system_message if system_message is None else system_message
    sys_prefix, sys_suffix = t.system_template.split("{system_message}")
    sep, user, assistant, ph = _lit(t.separator), _lit(t.roles[0]), _lit(t.roles[1]), _lit(image_placeholder)
    # Whitespace control on every tag: the template must emit only what the reference emits.
    return (
        "{%- macro render_content(content) -%}"
        "{%- if content is none -%}"
        "{%- elif content is string -%}{{- content -}}"
        "{%- else -%}"
        "{%- set ns = namespace(n=0, k=0) -%}"
        "{%- for part in content -%}{%- if part['type'] == 'image' -%}{%- set ns.n = ns.n + 1 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.k = ns.k + 1 -%}"
        f"{{%- if ns.n == 1 -%}}{{{{- {ph} + '\\n' -}}}}"
        f"{{%- else -%}}{{{{- 'Image-' + ns.k|string + ': ' + {ph} + '\\n' -}}}}{{%- endif -%}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- else -%}{{- raise_exception('unsupported content part type: ' + part['type']|string) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system_message = render_content(messages[0]['content']) -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        f"{{%- set system_message = {_lit(system)} -%}}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        f"{{{{- {_lit(sys_prefix)} + system_message + {_lit(sys_suffix)} + {sep} -}}}}"
        "{%- for message in loop_messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{%- set prefix = {user} -%}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{%- set prefix = {assistant} -%}}"
        "{%- else -%}{{- raise_exception('unsupported role: ' + message['role']|string) -}}{%- endif -%}"
        "{%- set text = render_content(message['content']) -%}"
        f"{{%- if text -%}}{{{{- prefix + text + {sep} -}}}}{{%- else -%}}{{{{- prefix -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {assistant} -}}}}{{%- endif -%}}"
    )
