"""Chat messages + images -> prompt token ids with image placeholders expanded.

Two builders sit behind a small registry:

- ``native``: transformers-native checkpoints render their own chat template verbatim
  (``tokenizer.apply_chat_template``). An image part renders as the tokenizer's ``context_image_token``
  (``<IMG_CONTEXT>``), which is then expanded to ``<img>`` + ``<IMG_CONTEXT>`` x (256 * tiles) + ``</img>``,
  exactly as transformers' ``InternVLProcessor`` does.
- ``template``: converted original-format checkpoints name an InternVL conversation template in
  ``config.json`` (``"template"``); ``services.convert.templates`` renders it with each image part
  written as the context token, then expansion is the same.

User text never becomes control tokens. When no text part contains the string of an added/special
token, the rendered prompt is tokenized in one piece (token-identical to the reference). Otherwise the
template is rendered with a private marker in place of each text part, the template's own text is
tokenized with special-token parsing on, and each user text with it off, so ``<|im_end|>`` or
``<IMG_CONTEXT>`` typed by a user is plain text: it can neither end a turn nor claim an image.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.types import TOKENS_PER_TILE
from services.decoder.engine.request import ImageSpan
from services.decoder.types import ROLES


@dataclass
class Prompt:
    token_ids: list[int]
    images: list[ImageSpan]  # one span per image, in prompt order
    num_image_tokens: int


class PromptBuilder:
    """Shared machinery: message validation, safe tokenization, placeholder expansion."""

    def __init__(self, tokenizer, tokens_per_tile: int = TOKENS_PER_TILE):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.context_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.start_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        vocab = tokenizer.get_vocab()
        for tok in (self.context_token, self.start_token, self.end_token):
            if tok not in vocab:
                raise FailedPrecondition(
                    f"the tokenizer has no {tok!r} token; is this an InternVL checkpoint?"
                )
        self.context_id = vocab[self.context_token]
        self.start_id = vocab[self.start_token]
        self.end_id = vocab[self.end_token]
        specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        self.special_strings = sorted((s for s in specials if s), key=len, reverse=True)
        # What the tokenizer puts in front of any text (InternLM2 / Llama: BOS; Qwen2: nothing). The
        # reference tokenizes its whole prompt with special tokens on, so the prompt starts with it.
        self.prefix_ids: list[int] = list(tokenizer("", add_special_tokens=True)["input_ids"])

    # -- to implement ---------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    # -- public ----------------------------------------------------------------------------------
    def build(
        self, messages: list[dict[str, Any]], image_tiles: list[int], image_hashes: list[str]
    ) -> Prompt:
        messages = normalize_messages(messages)
        num_parts = sum(1 for m in messages for p in parts_of(m) if p["type"] == "image")
        if num_parts != len(image_tiles):
            raise InvalidArgument(
                f"the messages have {num_parts} image parts but {len(image_tiles)} images were given",
                reason="image_count_mismatch",
            )
        ids = self._tokenize(messages)
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            ids = self.prefix_ids + ids
        return self._expand(ids, image_tiles, image_hashes)

    def _contains_special(self, text: str) -> bool:
        return any(s in text for s in self.special_strings)

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)[
            "input_ids"
        ]

    def _tokenize(self, messages: list[dict[str, Any]]) -> list[int]:
        texts = [p["text"] for m in messages for p in parts_of(m) if p["type"] == "text"]
        if not any(self._contains_special(t) for t in texts):
            return self._encode(self.render(messages), parse_special=True)
        marker = f"\x00{uuid.uuid4().hex}\x00"
        marked, k = [], 0
        for m in messages:
            if isinstance(m["content"], str):
                marked.append({**m, "content": f"{marker}{k}{marker}"})
                k += 1
                continue
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": f"{marker}{k}{marker}"})
                    k += 1
                else:
                    parts.append(p)
            marked.append({**m, "content": parts})
        rendered = self.render(marked)
        pieces = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", rendered)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self._encode(piece, parse_special=True)
            else:
                ids += self._encode(texts[int(piece)], parse_special=False)
        return ids

    def _expand(self, ids: list[int], image_tiles: list[int], image_hashes: list[str]) -> Prompt:
        if ids.count(self.context_id) != len(image_tiles):
            raise InvalidArgument(
                f"the prompt has {ids.count(self.context_id)} image placeholders for {len(image_tiles)} images",
                reason="image_count_mismatch",
            )
        out: list[int] = []
        spans: list[ImageSpan] = []
        k = 0
        for t in ids:
            if t != self.context_id:
                out.append(t)
                continue
            n = self.tokens_per_tile * image_tiles[k]
            out.append(self.start_id)
            spans.append(ImageSpan(len(out), n, image_hashes[k]))
            out.extend([self.context_id] * n)
            out.append(self.end_id)
            k += 1
        return Prompt(out, spans, sum(s.length for s in spans))

    def count_tokens(self, messages: list[dict[str, Any]], image_tiles: list[int]) -> tuple[int, int]:
        prompt = self.build(messages, image_tiles, [""] * len(image_tiles))
        return len(prompt.token_ids), prompt.num_image_tokens


class NativeChatTemplate(PromptBuilder):
    """The checkpoint's own chat template, through ``apply_chat_template``."""

    def __init__(self, tokenizer, tokens_per_tile: int = TOKENS_PER_TILE):
        super().__init__(tokenizer, tokens_per_tile)
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition("the checkpoint's tokenizer has no chat template")

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class NamedTemplate(PromptBuilder):
    """An InternVL conversation template named in ``config.json`` (converted checkpoints).

    Rendered by ``services.convert.templates`` exactly as the reference ``chat()`` builds prompts, with
    each image part written as the context token (so expansion is the same as for native templates).
    """

    def __init__(self, tokenizer, template_name: str, tokens_per_tile: int = TOKENS_PER_TILE):
        super().__init__(tokenizer, tokens_per_tile)
        try:
            from services.convert import templates
        except ImportError as exc:
            raise FailedPrecondition(
                f"the checkpoint names conversation template {template_name!r}, but no template registry "
                "is installed (services.convert.templates)"
            ) from exc
        self._render = templates.render_messages
        self.template = templates.get_template(template_name)

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self._render(self.template, messages, image_placeholder=self.context_token)


PROMPT_BUILDERS: dict[str, Callable[..., PromptBuilder]] = {
    "native": NativeChatTemplate,
    "template": NamedTemplate,
}


def load_prompt_builder(checkpoint: Checkpoint) -> PromptBuilder:
    """The checkpoint's tokenizer and the prompt builder its config asks for; ``FailedPrecondition``
    where the tokenizer cannot be loaded or lacks what InternVL prompts need. The engine builds its
    prompts with this, and ``services.decoder.support`` calls it before anything starts."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"cannot load the tokenizer of {checkpoint.path}: {exc}", reason="checkpoint_tokenizer"
        ) from exc
    tokens_per_tile = int(checkpoint.config.get("image_seq_length", TOKENS_PER_TILE))
    return make_prompt_builder(checkpoint.config, tokenizer, tokens_per_tile)


def make_prompt_builder(config: dict[str, Any], tokenizer, tokens_per_tile: int) -> PromptBuilder:
    """``native`` whenever the tokenizer carries a chat template (transformers-native checkpoints, and
    converted ones, whose template the converter rendered with the checkpoint's own system message);
    ``template`` (the InternVL conversation template that config.json names, with its built-in system
    message) only for a tokenizer without one."""
    name = config.get("template")
    if name and not getattr(tokenizer, "chat_template", None):
        return PROMPT_BUILDERS["template"](tokenizer, name, tokens_per_tile)
    return PROMPT_BUILDERS["native"](tokenizer, tokens_per_tile)


def parts_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate the message list and give every message a list of typed parts."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidArgument(f"messages[{i}] needs a role in {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            parts = content  # kept a string: templates may render strings and part lists differently
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    parts.append({"type": "image"})
                else:
                    raise InvalidArgument(f"messages[{i}].content[{j}] must be a text or image part")
        else:
            raise InvalidArgument(f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": m["role"], "content": parts})
    return out
