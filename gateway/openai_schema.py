"""The OpenAI chat-completions request schema we accept, and its translation to ``ChatRequest``.

Bounded everywhere; fields we do not implement are refused by name (400) rather than ignored, so a
client never believes it got tools when it did not. ``response_format`` (``json_object``, ``json_schema``) and
``logit_bias`` are OpenAI's and checked alike for both APIs (``gateway.intake.response_format``, the
decoder's ``check_logit_bias``), and so is ``n`` (against the tenant's ``max_n``, by ``Gateway.chat``). Extensions beyond OpenAI: ``top_k``,
``repetition_penalty``, per-image ``max_num`` (also settable per request) and ``timeout``.

The schema checks types and the ranges of sampling values; the rules of the conversation and the
request's limits (message count, roles, empty content, images outside user messages, text bytes,
``top_logprobs``, ``max_tokens``) are checked for both APIs alike after translation (``gateway.intake``,
``Gateway.chat``), so they are refused here and over gRPC with the same reason and message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.images import decode_data_uri, is_remote, max_num_for_detail
from gateway.intake import response_format
from gateway.types import ChatRequest, ImagePart, Message, TextPart
from gateway.videos import decode_video_data_uri, video_part
from services.common.errors import InvalidArgument
from services.common.limits import MAX_TILES_PER_IMAGE, MAX_TOKENS_PER_REQUEST
from services.decoder.engine.response_format import parse_logit_bias

UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "modalities": "non-text output",
    "prediction": "predicted outputs",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] | None = None
    max_num: int | None = Field(default=None, ge=1, le=MAX_TILES_PER_IMAGE)


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=96 * 1024 * 1024)
    num_frames: int | None = Field(default=None, description="Extension: frames to sample (1..64; 8).")
    bound: tuple[float, float] | None = Field(default=None, description="Extension: [start, end] seconds.")
    max_num: int | None = Field(default=None, description="Extension: tiles per frame at most (1).")


class VideoContent(BaseModel):
    """vLLM's and LMDeploy's ``video_url`` content part."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["video_url"]
    video_url: VideoURL

    def to_domain(self, allow_remote: bool):
        v = self.video_url
        remote = allow_remote and is_remote(v.url)
        data = b"" if remote else decode_video_data_uri(v.url)
        return video_part(data, v.url if remote else None, v.num_frames, v.bound, v.max_num)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(max_length=64, description="system, user, assistant, or developer (= system).")
    content: str | list[TextContent | ImageContent | VideoContent] | None = None
    name: str | None = Field(default=None, max_length=64)


class JsonSchemaIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = Field(default=None, max_length=1024)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted: the schema is enforced either way


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(max_length=64)
    json_schema: JsonSchemaIn | None = None

    def to_domain(self):
        spec = self.json_schema or JsonSchemaIn()
        return response_format(self.type, spec.name, spec.schema_)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_PER_REQUEST)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_PER_REQUEST)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=1 << 20)
    n: int | None = Field(default=None, description="Choices; 1..the tenant's max_n, checked at intake.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    max_num: int | None = Field(
        default=None, ge=1, le=MAX_TILES_PER_IMAGE, description="Extension: tile cap for every image."
    )
    timeout: float | None = Field(default=None, gt=0, le=86_400, description="Extension: seconds.")
    response_format: ResponseFormatIn | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        items = [v] if isinstance(v, str) else v
        if len(items) > 4 or any(not s or len(s) > 256 for s in items):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return items

    def unsupported_fields(self) -> list[str]:
        extra = set((self.model_extra or {}).keys())
        return sorted(
            f"{k} ({UNSUPPORTED[k]})" for k in extra & UNSUPPORTED.keys() if self.model_extra[k] is not None
        )

    def image_count(self) -> int:
        """Image parts, counted before any is decoded."""
        return sum(
            1
            for m in self.messages
            if not isinstance(m.content, str) and m.content is not None
            for part in m.content
            if not isinstance(part, TextContent)
        )

    def to_domain(self, model_max_tiles: int, allow_remote: bool = False) -> ChatRequest:
        unsupported = self.unsupported_fields()
        if unsupported:
            raise InvalidArgument(f"not supported: {', '.join(unsupported)}", reason="unsupported_parameter")
        messages = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            parts: list = []
            if isinstance(m.content, str):
                parts.append(TextPart(m.content))
            elif m.content is not None:
                for part in m.content:
                    if isinstance(part, TextContent):
                        parts.append(TextPart(part.text))
                    elif isinstance(part, VideoContent):
                        parts.append(part.to_domain(allow_remote))
                    else:
                        url = part.image_url.url
                        remote = allow_remote and is_remote(url)
                        data = b"" if remote else decode_data_uri(url)
                        max_num = (
                            part.image_url.max_num
                            or self.max_num
                            or max_num_for_detail(part.image_url.detail, model_max_tiles)
                        )
                        parts.append(ImagePart(data, max_num, url if remote else None))
            messages.append(Message(role, parts))
        max_tokens = self.max_completion_tokens or self.max_tokens
        return ChatRequest(
            model=self.model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=list(self.stop or []),
            seed=self.seed,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            timeout_s=self.timeout,
            response_format=self.response_format.to_domain() if self.response_format else None,
            logit_bias=parse_logit_bias(self.logit_bias or {}),
            n=1 if self.n is None else self.n,
        )


def error_body(message: str, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        504: "timeout_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
