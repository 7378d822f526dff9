"""The decoder's domain types (no torch import, no gRPC).

Two kinds of type live here:

- The hop between the gateway and the decoder: a :class:`DecodeRequest` in (typed chat messages,
  :class:`SamplingParams`, ``max_tokens``; the embedding references and the ``RequestContext`` travel
  beside it), :class:`GenerationEvent` s out. The same objects cross Ray handles (they pickle) and, through
  ``services.decoder.pb`` at the servicer's edge, gRPC.
- The engine's input, :class:`GenerateInput`: the same request with every image resolved to its
  embeddings and the messages in the chat template's form (``template_messages``).

The engine produces the events; ``DecoderFrontend`` fills in the token strings of their log-probabilities.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.decoder.engine.sampling_params import SamplingParams

__all__ = [
    "ChatMessage",
    "DecodeRequest",
    "FinishReason",
    "GenerateInput",
    "GenerationEvent",
    "ImageEmbedding",
    "ImagePlaceholder",
    "SamplingParams",
    "TextContent",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "VideoPlaceholder",
    "template_messages",
]


class FinishReason(enum.StrEnum):
    """Why a request's stream ended. Front ends map it to their wire spelling in one place each."""

    STOP = "stop"  # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the context is full
    CANCELLED = "cancelled"  # the caller went away, or aborted it
    DEADLINE = "deadline"  # the request context's deadline passed
    ERROR = "error"  # the engine failed; the event's ``error`` says how


# -- the request ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextContent:
    text: str


@dataclass(frozen=True)
class ImagePlaceholder:
    """Where the next image goes: the k-th placeholder of a request is its k-th embedding reference."""


@dataclass(frozen=True)
class VideoPlaceholder:
    """Where the next video goes: ``frames`` sampled frames, rendered as the checkpoint labels video
    frames (``services.decoder.prompting``). A video is one embedding reference, like an image; its
    tiles are the frames' tiles, frame by frame."""

    frames: int


# The roles of a chat message, as the chat templates know them (the gateway maps HTTP's "developer" to
# "system" before a request gets here).
ROLES = ("system", "user", "assistant")


@dataclass
class ChatMessage:
    role: str  # one of ROLES
    content: list[TextContent | ImagePlaceholder | VideoPlaceholder]

    @property
    def num_images(self) -> int:
        """Image and video parts: each takes one embedding reference."""
        return sum(1 for p in self.content if isinstance(p, ImagePlaceholder | VideoPlaceholder))


@dataclass
class DecodeRequest:
    """One chat completion to decode. The request id, tenant, priority and deadline are the
    ``RequestContext``'s; the images are the embedding references sent with it, in placeholder order.
    ``max_tokens`` ``None`` means up to the context. ``n``: the choices to generate, each a sample of the
    same prompt (``services.decoder.samples``); their events carry the choice's ``index``."""

    messages: list[ChatMessage]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    n: int = 1

    @property
    def num_images(self) -> int:
        return sum(m.num_images for m in self.messages)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The chat template's form of the messages (what ``GenerateInput.messages`` holds): a message of text
    only is one string (templates may render strings and part lists differently), else a part list."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if all(isinstance(p, TextContent) for p in m.content):
            out.append({"role": m.role, "content": "".join(p.text for p in m.content)})
        else:
            parts = [_template_part(p) for p in m.content]
            out.append({"role": m.role, "content": parts})
    return out


def _template_part(part: TextContent | ImagePlaceholder | VideoPlaceholder) -> dict[str, Any]:
    if isinstance(part, TextContent):
        return {"type": "text", "text": part.text}
    if isinstance(part, VideoPlaceholder):
        return {"type": "video", "frames": part.frames}
    return {"type": "image"}


def entry_frames(messages: list[ChatMessage]) -> list[int]:
    """Frames of each image or video part in order (an image is one frame): what the embedding
    references of the request must say."""
    return [
        p.frames if isinstance(p, VideoPlaceholder) else 1
        for m in messages
        for p in m.content
        if isinstance(p, ImagePlaceholder | VideoPlaceholder)
    ]


# -- the engine's input -----------------------------------------------------------------------------
@dataclass
class ImageEmbedding:
    """One image's projected vision features: ``embeddings`` is a torch tensor (tiles * 256, hidden).

    ``content_hash`` names the image bytes + tiling (as the embedding cache does); it keys the KV prefix
    cache, because every image yields the same placeholder token ids.
    """

    embeddings: Any
    tiles: int
    content_hash: str


@dataclass
class GenerateInput:
    """One chat completion to run.

    ``messages``: the chat template's form, ``[{"role": "system"|"user"|"assistant", "content": str |
    [part, ...]}]`` with parts ``{"type": "text", "text": str}`` and ``{"type": "image"}``
    (``template_messages`` builds it from a ``DecodeRequest``); ``images`` follow the image parts in
    order. ``deadline`` is absolute, in ``time.monotonic()`` seconds (or epoch seconds when
    ``deadline_is_epoch``). ``priority``: higher runs first;
    ``tenant``, ``weight``, ``max_kv_share``: the scheduler's fair share between tenants. ``max_tokens`` ``None`` means up to the context.
    ``prefix_group``: the samples of one request with ``n`` > 1 (``DecoderFrontend``) name the same group,
    so the scheduler prefills their shared prompt once (``engine.siblings``); None for a lone request.
    """

    request_id: str
    messages: list[dict[str, Any]]
    images: list[ImageEmbedding] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    cache_namespace: str = ""
    priority: int = 0
    tenant: str = ""
    weight: float = 1.0
    max_kv_share: float | None = None
    deadline: float | None = None
    deadline_is_epoch: bool = False
    prefix_group: str | None = None


# -- the events -------------------------------------------------------------------------------------
@dataclass
class TopLogprob:
    """An alternative to the chosen token. ``token`` / ``token_bytes`` (its text and that text's UTF-8
    bytes) are empty as the engine makes it; ``DecoderFrontend`` fills them in."""

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""


@dataclass
class TokenLogprob:
    """The chosen token's log-probability (from the model's distribution before temperature and
    filters) and the top alternatives, best first. Token strings as in :class:`TopLogprob`."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    token: str = ""
    token_bytes: bytes = b""


@dataclass
class Usage:
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    """A streamed step of one request. The last event has ``finish_reason`` and ``usage`` set.

    With ``n`` > 1 each event is one choice's (``index`` 0..n-1) and each choice ends with its own last
    event, whose ``usage`` counts that choice's completion and the (shared) prompt.

    ``text`` is the new text only (never a broken UTF-8 sequence); ``token_ids`` the new token ids
    (a stop token is included in ids but not in text; text cut by a stop string is not emitted).
    ``error`` is set on a last event whose ``finish_reason`` is ``ERROR``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    # On the first event: the prompt's size, so a request cancelled before its last event still
    # accounts for the prompt it was given (the last event's ``usage`` says it again).
    prompt_tokens: int | None = None
    image_tokens: int | None = None
    index: int = 0  # the choice this event belongs to (``DecodeRequest.n``)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
