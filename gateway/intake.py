"""Intake: what both public APIs (OpenAI-compatible HTTP and gRPC) check, written once.

A front end only translates its wire format into a ``ChatRequest`` (``openai_schema``, ``grpc_api``)
and reads the caller's credentials and trace context with the functions here; ``Gateway.chat`` then
applies ``check_conversation`` and the tenant's limits (``Tenant.max_tokens``,
``Tenant.check_request_size``) to every request alike. So one bad request gets one refusal: the same
reason and message, as an HTTP status or the matching gRPC code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from gateway.types import ChatRequest, ImagePart, TextPart, VideoPart
from services.common.errors import InvalidArgument
from services.common.limits import MAX_MESSAGES, MAX_TEXT_BYTES, MAX_TOP_LOGPROBS
from services.decoder.engine.response_format import REASON_INVALID, ResponseFormat
from services.decoder.types import ROLES

TRACE_HEADERS = ("traceparent", "tracestate")
JSON_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name


def response_format(kind: str, name: str | None = None, schema: Any = None) -> ResponseFormat | None:
    """OpenAI's ``response_format`` as either API spells it: None for ``text``, else the domain's
    ``ResponseFormat``; InvalidArgument (``response_format_invalid``) for an unknown type, a json_schema
    without a valid ``name`` or without a ``schema`` (a JSON object, or its JSON text over gRPC)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind != "json_schema":
        raise InvalidArgument(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}",
            reason=REASON_INVALID,
        )
    if name is None or not JSON_SCHEMA_NAME.fullmatch(name):
        raise InvalidArgument(
            "response_format.json_schema.name must be 1..64 letters, digits, '_' or '-'",
            reason=REASON_INVALID,
        )
    if schema is None or schema == "":
        raise InvalidArgument("response_format.json_schema.schema is required", reason=REASON_INVALID)
    return ResponseFormat.json_schema(schema)


def api_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The API key among HTTP headers or gRPC metadata: ``authorization: Bearer <key>``, else
    ``x-api-key: <key>``; None when neither holds one."""
    bearer = plain = None
    for name, value in headers:
        name = name.lower()
        if name == "authorization" and bearer is None and value[:7].lower() == "bearer ":
            bearer = value[7:].strip() or None
        elif name == "x-api-key" and plain is None:
            plain = value.strip() or None
    return bearer or plain


def requested_model(headers: Iterable[tuple[str, str]]) -> str:
    """The model an internal client names in ``x-model`` metadata (its protos carry none); "" if none."""
    for name, value in headers:
        if name.lower() == "x-model":
            return value.strip()
    return ""


def trace_context(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The caller's W3C trace context (``traceparent``, ``tracestate``) among headers or metadata."""
    out: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name in TRACE_HEADERS and name not in out:
            out[name] = value
    return out


def text_bytes(req: ChatRequest) -> int:
    """UTF-8 bytes of every text part of the request."""
    return sum(
        len(p.text.encode("utf-8", "surrogatepass"))
        for m in req.messages
        for p in m.parts
        if isinstance(p, TextPart)
    )


def check_conversation(req: ChatRequest) -> None:
    """InvalidArgument, with a reason, for a request no model should be asked to answer: no messages or
    too many, an unknown role, an empty message, an image outside a user message, a conversation that
    ends with the assistant, too much text, or ``top_logprobs`` out of range or without ``logprobs``."""
    messages = req.messages
    if not messages:
        raise InvalidArgument("messages must not be empty", reason="messages_empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(
            f"{len(messages)} messages, over the limit of {MAX_MESSAGES}", reason="too_many_messages"
        )
    for k, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(
                f"messages[{k}].role must be system, user or assistant, got {m.role!r}", reason="invalid_role"
            )
        if not m.parts:
            raise InvalidArgument(f"messages[{k}].content must not be empty", reason="empty_content")
        if m.role != "user" and any(isinstance(p, ImagePart | VideoPart) for p in m.parts):
            raise InvalidArgument(
                f"messages[{k}]: images and videos are accepted in user messages only",
                reason="image_not_in_user_message",
            )
    if messages[-1].role == "assistant":
        raise InvalidArgument(
            "the last message must not be from the assistant", reason="last_message_from_assistant"
        )
    if text_bytes(req) > MAX_TEXT_BYTES:
        raise InvalidArgument(f"message text exceeds {MAX_TEXT_BYTES} bytes", reason="prompt_too_long")
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
            reason="invalid_parameter",
        )
    if req.top_logprobs and not req.logprobs:
        raise InvalidArgument("top_logprobs requires logprobs: true", reason="invalid_parameter")
