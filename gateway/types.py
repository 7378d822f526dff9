"""The gateway's domain objects: what both public APIs (HTTP and gRPC) turn a request into."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.decoder.engine.response_format import ResponseFormat
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    FinishReason,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
    VideoPlaceholder,
)


@dataclass
class ImagePart:
    data: bytes
    max_num: int | None = None  # None: the model's default (never above the tenant's cap)
    url: str | None = None  # a remote image still to fetch (only where remote images are enabled)


@dataclass
class VideoPart:
    """A video: its frames are sampled as the reference's ``load_video`` samples them (``num_frames``
    segments, optionally within ``bound`` seconds), each tiled with ``max_num`` tiles (1: one tile)."""

    data: bytes
    num_frames: int | None = None  # None: the default (8)
    bound: tuple[float, float] | None = None
    max_num: int | None = None  # None: one tile per frame
    url: str | None = None  # a remote video still to fetch (only where remote fetching is enabled)


@dataclass
class TextPart:
    text: str


@dataclass
class Message:
    role: str
    parts: list[TextPart | ImagePart | VideoPart]


@dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    timeout_s: float | None = None
    response_format: ResponseFormat | None = None  # None: free text
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # choices: samples of the same prompt (the tenant's ``max_n`` caps it)
    request_id: str = ""
    trace: dict[str, str] = field(default_factory=dict)  # the caller's W3C trace context, if any

    @property
    def images(self) -> list[ImagePart | VideoPart]:
        """Image and video parts in order: each is one embedding reference."""
        return [p for m in self.messages for p in m.parts if isinstance(p, ImagePart | VideoPart)]

    def decode_request(self, max_tokens: int) -> DecodeRequest:
        """What the decoder is asked: the messages with a placeholder for each image (the images travel
        as embedding references beside it), the sampling values and the admitted ``max_tokens``."""
        return DecodeRequest(
            messages=[
                ChatMessage(
                    m.role,
                    [_placeholder(p) for p in m.parts],
                )
                for m in self.messages
            ],
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                seed=self.seed,
                stop=list(self.stop),
                logprobs=self.top_logprobs if self.logprobs else None,
                response_format=self.response_format,
                logit_bias=dict(self.logit_bias),
            ),
            max_tokens=max_tokens,
            n=self.n,
        )


def _placeholder(part: TextPart | ImagePart | VideoPart):
    if isinstance(part, TextPart):
        return TextContent(part.text)
    if isinstance(part, VideoPart):
        from services.common.limits import DEFAULT_FRAMES_PER_VIDEO

        return VideoPlaceholder(part.num_frames or DEFAULT_FRAMES_PER_VIDEO)
    return ImagePlaceholder()


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    cached_images: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the decoder's prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatChunk:
    """A streamed piece of the answer to one choice (``index``); a choice's last piece has its
    ``finish_reason``, and the stream's last piece the ``usage`` of the whole request (the prompt once,
    the completions of every choice)."""

    request_id: str
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    index: int = 0
