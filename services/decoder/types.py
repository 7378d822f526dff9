"""The decoder's domain API types (no torch import, no gRPC).

The servicer converts protobuf messages into :class:`GenerateInput` and each
:class:`GenerationEvent` back into a protobuf message; nothing else crosses that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.decoder.engine.sampling_params import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")


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

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str | [part, ...]}]`` with parts
    ``{"type": "text", "text": str}`` and ``{"type": "image"}``; ``images`` follow the image parts in
    order. ``deadline`` is absolute, in ``time.monotonic()`` seconds (or epoch seconds when
    ``deadline_is_epoch``). ``priority``: higher runs first. ``max_tokens`` ``None`` means up to the context.
    """

    request_id: str
    messages: list[dict[str, Any]]
    images: list[ImageEmbedding] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    cache_namespace: str = ""
    priority: int = 0
    deadline: float | None = None
    deadline_is_epoch: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


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

    ``text`` is the new text only (never a broken UTF-8 sequence); ``token_ids`` the new token ids
    (a stop token is included in ids but not in text; text cut by a stop string is not emitted).
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    # On the first event: the prompt's size, so a request cancelled before its last event still
    # accounts for the prompt it was given (the last event's ``usage`` says it again).
    prompt_tokens: int | None = None
    image_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
