"""The decoder's wire conversions and its hop types, without a model: every field of a request and of an
event survives ``to_pb`` → ``from_pb`` and pickling (what a Ray handle does), and each front end spells
every finish reason."""

from __future__ import annotations

import pickle

import pytest
from internvl.decoder.v1 import decoder_pb2

from services.common.errors import InvalidArgument
from services.decoder.engine.response_format import ResponseFormat
from services.decoder.pb import (
    decode_request_from_pb,
    decode_request_to_pb,
    event_from_pb,
    event_to_pb,
    messages_from_pb,
)
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    FinishReason,
    GenerationEvent,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
    TokenLogprob,
    TopLogprob,
    Usage,
    template_messages,
)

REQUEST = DecodeRequest(
    messages=[
        ChatMessage("system", [TextContent("Be brief.")]),
        ChatMessage("user", [ImagePlaceholder(), TextContent("and"), ImagePlaceholder()]),
    ],
    sampling=SamplingParams(
        temperature=0.5,
        top_p=0.25,
        top_k=4,
        repetition_penalty=1.5,
        frequency_penalty=-0.5,
        presence_penalty=0.75,
        seed=11,
        stop=["\n\n"],
        stop_token_ids=[7],
        ignore_eos=True,
        logprobs=2,
        skip_special_tokens=False,
        response_format=ResponseFormat("json_schema", '{"type":"object","required":["b","a"]}', 250),
        logit_bias={3: -100.0, 50: 2.5},
    ),
    max_tokens=9,
    n=3,
)

EVENTS = [
    GenerationEvent("r1", "", [5], prompt_tokens=300, image_tokens=256),
    GenerationEvent(
        "r1",
        "é",
        [6, 7],
        [
            TokenLogprob(6, -0.5, [TopLogprob(6, -0.5, "é", "é".encode()), TopLogprob(9, -1.25, "a", b"a")], "é", "é".encode()),
            TokenLogprob(7, -2.0, [], "", b""),
        ],
    ),
    GenerationEvent("r1", "", [], finish_reason=FinishReason.LENGTH, usage=Usage(300, 256, 3, 16)),
    GenerationEvent("r1", "b", [8], finish_reason=FinishReason.STOP, usage=Usage(300, 256, 1, 0), index=2),
    GenerationEvent("r2", "", [], finish_reason=FinishReason.ERROR, usage=Usage(4, 0, 0), error="boom"),
]  # fmt: skip


def test_a_request_round_trips():
    pb = decode_request_to_pb(REQUEST)
    pb.images.add()
    pb.images.add()  # two references for the two placeholders (their contents are not this test's)
    assert decode_request_from_pb(pb) == REQUEST
    assert pickle.loads(pickle.dumps(REQUEST)) == REQUEST


def test_defaults_round_trip():
    request = DecodeRequest([ChatMessage("user", [TextContent("hi")])])
    assert decode_request_from_pb(decode_request_to_pb(request)) == request


def test_response_formats_cross_the_wire():
    plain = DecodeRequest([ChatMessage("user", [TextContent("hi")])])
    plain.sampling.response_format = ResponseFormat.json_object()
    assert decode_request_from_pb(decode_request_to_pb(plain)) == plain
    pb = decode_request_to_pb(plain)
    pb.sampling.response_format.type = decoder_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    pb.sampling.response_format.schema = '{ "type" : "object",\n "required": [] }'  # a foreign client's text
    got = decode_request_from_pb(pb).sampling.response_format
    assert got == ResponseFormat("json_schema", '{"type":"object","required":[]}')  # the cache key's form
    for schema, match in [("", "needs a schema"), ("{oops", "not JSON")]:
        pb.sampling.response_format.schema = schema
        with pytest.raises(InvalidArgument, match=match):
            decode_request_from_pb(pb)
    pb.sampling.response_format.type = 7  # a type this decoder does not know
    with pytest.raises(InvalidArgument, match="not a known type"):
        decode_request_from_pb(pb)


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_an_event_round_trips(event):
    assert event_from_pb(event_to_pb(event)) == event
    assert pickle.loads(pickle.dumps(event)) == event


def test_every_finish_reason_has_a_wire_value():
    for reason in FinishReason:
        event = GenerationEvent("r", "", [], finish_reason=reason, usage=Usage(1, 0, 0))
        assert event_to_pb(event).finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
        assert event_from_pb(event_to_pb(event)).finish_reason is reason


def test_image_parts_name_the_references_in_order():
    out_of_order = [decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(image_index=1)])]
    with pytest.raises(InvalidArgument, match="in order"):
        messages_from_pb(out_of_order, 2)
    with pytest.raises(InvalidArgument, match="1 image parts but 2"):
        messages_from_pb([decoder_pb2.Message(role="user", content=[{"image_index": 0}])], 2)


def test_template_messages():
    assert template_messages(REQUEST.messages) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
        },
    ]
    joined = [ChatMessage("user", [TextContent("a"), TextContent("b")])]
    assert template_messages(joined) == [{"role": "user", "content": "ab"}]


def test_finish_reasons_are_spelled_as_the_public_apis_spell_them():
    """Both public APIs send a finish reason's value as it is: changing one changes the wire."""
    assert [r.value for r in FinishReason] == ["stop", "length", "cancelled", "deadline", "error"]
