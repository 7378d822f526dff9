"""The intake rules as pure functions: credentials, trace context and the conversation, without servers
(the same rules through both real APIs: test_intake_parity.py)."""

from __future__ import annotations

import pytest

from gateway.intake import api_key, check_conversation, trace_context
from gateway.types import ChatRequest, ImagePart, Message, TextPart
from services.common.errors import InvalidArgument


@pytest.mark.parametrize(
    "headers, key",
    [
        ([("authorization", "Bearer ivm-a-b")], "ivm-a-b"),
        ([("Authorization", "bearer  ivm-a-b ")], "ivm-a-b"),  # scheme is case-insensitive
        ([("x-api-key", "ivm-a-b")], "ivm-a-b"),
        ([("x-api-key", "plain"), ("authorization", "Bearer bearer")], "bearer"),  # Bearer wins
        ([("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", "plain")], "plain"),
        ([("authorization", "Bearer "), ("x-api-key", "")], None),
        ([("user-agent", "test")], None),
        ([], None),
    ],
)
def test_api_key(headers, key):
    assert api_key(headers) == key


def test_trace_context_keeps_the_w3c_headers_only():
    headers = [("TraceParent", "00-a-b-01"), ("tracestate", "k=v"), ("baggage", "x"), ("traceparent", "late")]
    assert trace_context(headers) == {"traceparent": "00-a-b-01", "tracestate": "k=v"}


def _req(*messages: tuple[str, list], **fields) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(role, parts) for role, parts in messages], **fields)


HI = ("user", [TextPart("Hi")])
IMG = ImagePart(b"\x89PNG")


@pytest.mark.parametrize(
    "req, reason",
    [
        (_req(), "messages_empty"),
        (_req(*[HI] * 257), "too_many_messages"),
        (_req(("tool", [TextPart("x")]), HI), "invalid_role"),
        (_req(("user", [])), "empty_content"),
        (_req(("system", [IMG]), HI), "image_not_in_user_message"),
        (_req(HI, ("assistant", [IMG]), HI), "image_not_in_user_message"),
        (_req(HI, ("assistant", [TextPart("Hello")])), "last_message_from_assistant"),
        (_req(("user", [TextPart("é" * (512 * 1024 + 1))])), "prompt_too_long"),  # bytes, not characters
        (_req(HI, top_logprobs=2), "invalid_parameter"),
        (_req(HI, logprobs=True, top_logprobs=21), "invalid_parameter"),
        (_req(HI, logprobs=True, top_logprobs=-1), "invalid_parameter"),
    ],
)
def test_conversation_rules(req, reason):
    with pytest.raises(InvalidArgument) as err:
        check_conversation(req)
    assert err.value.reason == reason


def test_a_good_conversation_passes():
    check_conversation(
        _req(
            ("system", [TextPart("Be brief.")]),
            ("user", [IMG, TextPart("What is it?")]),
            ("assistant", [TextPart("A cat.")]),
            ("user", [TextPart("")]),  # empty text is content: OpenAI accepts it too
            *[HI] * 252,
            logprobs=True,
            top_logprobs=20,
        )
    )
