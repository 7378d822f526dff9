"""Chat messages + images -> prompt token ids with image placeholders expanded.

Two builders sit behind a small registry:

- ``native``: transformers-native checkpoints render their own chat template verbatim
  (``tokenizer.apply_chat_template``). An image part renders as the tokenizer's ``context_image_token``
  (``<IMG_CONTEXT>``), which is then expanded to ``<img>`` + ``<IMG_CONTEXT>`` x (256 * tiles) + ``</img>``,
  exactly as transformers' ``InternVLProcessor`` does.
- ``template``: converted original-format checkpoints name an InternVL conversation template in
  ``config.json`` (``"template"``); ``services.convert.templates`` renders it with each image part
  written as the context token, then expansion is the same.

Videos (``{"type": "video", "frames": n}`` parts) are rendered as the checkpoint renders them
(``FrameStyle``): one labelled context token per frame, each then expanded like an image of the video's
tiles per frame. A video is one entry of ``image_tiles`` (its tiles, frame by frame).

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
from dataclasses import dataclass, field
from typing import Any

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.types import TOKENS_PER_TILE
from services.decoder.engine.request import ImageSpan
from services.decoder.types import ROLES


@dataclass
class Prompt:
    token_ids: list[int]
    images: list[ImageSpan]  # one span per image or video frame, in prompt order
    num_image_tokens: int
    # per span: (entry, first row) of the embeddings it takes (an image is one entry, a video one entry
    # of all its frames)
    sources: list[tuple[int, int]] = field(default_factory=list)

    def embeddings_for(self, entries: list[Any]) -> list[Any]:
        """Each span's rows of ``entries`` (one (rows, hidden) tensor per image or video): views."""
        return [entries[k][row : row + span.length] for span, (k, row) in zip(self.images, self.sources)]


@dataclass(frozen=True)
class FrameStyle:
    """How a checkpoint labels video frames (INTERNVL.md, "Prompt side").

    ``native``: the checkpoint's chat template renders a video part as the tokenizer's video token and
    the frames replace it as transformers' ``InternVLProcessor.replace_video_token`` writes them:
    ``"\n".join(f"Frame{i + 1}: <image>")`` (the template's own newline follows). Otherwise the video part
    is written where the template puts text, as the reference's ``load_video`` callers write it:
    ``"".join(f"{label}<image>\n")`` with ``label`` ``Frame-{k}: `` (OpenGVLab's current model cards,
    InternVL 2.5 and 3) or ``Frame{k}: `` (the InternVL 2.0 model cards).
    """

    label: str = "Frame-{k}: "
    native: bool = False

    def text(self, frames: int, image: str) -> str:
        labelled = [self.label.format(k=k + 1) + image for k in range(frames)]
        return "\n".join(labelled) if self.native else "".join(f"{x}\n" for x in labelled)


# The label of the reference's video prompt by conversation template: 2.5 / 3 write ``Frame-1:``, the
# 2.0 model cards ``Frame1:``. A checkpoint's config.json may name its own (``video_frame_label``).
TEMPLATE_FRAME_LABELS = {"internvl2_5": "Frame-{k}: "}
LEGACY_FRAME_LABEL = "Frame{k}: "
NATIVE_FRAME_LABEL = "Frame{k}: "


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
        self.video_token: str | None = getattr(tokenizer, "video_token", None)
        self.frame_style = FrameStyle()  # set from the checkpoint by ``make_prompt_builder``

    def renders_video_natively(self) -> bool:
        """Whether the chat template writes a video part as the tokenizer's video token."""
        if not self.video_token:
            return False
        probe = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]
        try:
            return self.render(probe).count(self.video_token) == 1
        except Exception:  # a template that refuses video parts
            return False

    # -- to implement ---------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    # -- public ----------------------------------------------------------------------------------
    def build(
        self, messages: list[dict[str, Any]], image_tiles: list[int], image_hashes: list[str]
    ) -> Prompt:
        messages = normalize_messages(messages)
        num_parts = sum(1 for m in messages for p in parts_of(m) if p["type"] in ("image", "video"))
        if num_parts != len(image_tiles):
            raise InvalidArgument(
                f"the messages have {num_parts} image parts but {len(image_tiles)} images were given",
                reason="image_count_mismatch",
            )
        ids = self._tokenize(messages)
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            ids = self.prefix_ids + ids
        return self._expand(ids, *_per_context_token(messages, image_tiles, image_hashes))

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
            return self._encode(self._render_frames(messages), parse_special=True)
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
        rendered = self._render_frames(marked)
        pieces = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", rendered)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self._encode(piece, parse_special=True)
            else:
                ids += self._encode(texts[int(piece)], parse_special=False)
        return ids

    def _render_frames(self, messages: list[dict[str, Any]]) -> str:
        """``render``, with every video part written as its frames (``FrameStyle``)."""
        frames = [p["frames"] for m in messages for p in parts_of(m) if p["type"] == "video"]
        if not frames:
            return self.render(messages)
        style = self.frame_style
        slot = self.video_token if style.native else f"\x00{uuid.uuid4().hex}\x00"
        stand_in = {"type": "video"} if style.native else {"type": "text", "text": slot}
        swapped = [
            m
            if isinstance(m["content"], str)
            else {**m, "content": [stand_in if p["type"] == "video" else p for p in m["content"]]}
            for m in messages
        ]
        pieces = self.render(swapped).split(slot)
        if len(pieces) != len(frames) + 1:
            raise InvalidArgument(
                f"the chat template placed {len(pieces) - 1} of {len(frames)} videos",
                reason="image_count_mismatch",
            )
        out = pieces[0]
        for n, rest in zip(frames, pieces[1:]):
            out += style.text(n, self.context_token) + rest
        return out

    def _expand(
        self, ids: list[int], image_tiles: list[int], image_hashes: list[str], sources: list[tuple[int, int]]
    ) -> Prompt:
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
        rows = [(entry, first * self.tokens_per_tile) for entry, first in sources]
        return Prompt(out, spans, sum(s.length for s in spans), rows)

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
        builder = PROMPT_BUILDERS["template"](tokenizer, name, tokens_per_tile)
    else:
        builder = PROMPT_BUILDERS["native"](tokenizer, tokens_per_tile)
    builder.frame_style = frame_style(config, builder)
    return builder


def frame_style(config: dict[str, Any], builder: PromptBuilder) -> FrameStyle:
    """The checkpoint's way of labelling video frames: ``video_frame_label`` in its config.json if set
    (a format with ``{k}``, the frame number from 1); else transformers' when its chat template renders
    video parts itself; else the reference's for its conversation template (``Frame-{k}: `` for
    ``internvl2_5``, ``Frame{k}: `` for the 2.0-era templates)."""
    native = builder.renders_video_natively()
    label = config.get("video_frame_label")
    if label is None:
        label = (
            NATIVE_FRAME_LABEL
            if native
            else TEMPLATE_FRAME_LABELS.get(config.get("template") or "internvl2_5", LEGACY_FRAME_LABEL)
        )
    if not isinstance(label, str) or "{k}" not in label or len(label) > 64:
        raise FailedPrecondition(f"video_frame_label must be a short string with {{k}}, got {label!r}")
    return FrameStyle(label=label, native=native)


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
                elif kind == "video" and _is_count(p.get("frames")):
                    parts.append({"type": "video", "frames": p["frames"]})
                else:
                    raise InvalidArgument(f"messages[{i}].content[{j}] must be a text, image or video part")
        else:
            raise InvalidArgument(f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": m["role"], "content": parts})
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _per_context_token(
    messages: list[dict[str, Any]], image_tiles: list[int], image_hashes: list[str]
) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Tiles, hash and (entry, first tile) of every context token in prompt order: an image is one,
    a video one per frame, each frame ``tiles / frames`` tiles of its video's embeddings."""
    tiles, hashes, sources = [], [], []
    entry = 0
    for m in messages:
        for p in parts_of(m):
            if p["type"] not in ("image", "video"):
                continue
            frames = p["frames"] if p["type"] == "video" else 1
            if image_tiles[entry] % frames:
                raise InvalidArgument(
                    f"video {entry}: {image_tiles[entry]} tiles are not {frames} frames of equal tiles",
                    reason="image_count_mismatch",
                )
            per_frame = image_tiles[entry] // frames
            for f in range(frames):
                tiles.append(per_frame)
                name = image_hashes[entry]
                hashes.append(f"{name}#frame{f}" if name and p["type"] == "video" else name)
                sources.append((entry, f * per_frame))
            entry += 1
    return tiles, hashes, sources
