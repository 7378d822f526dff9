"""Structured outputs and ``logit_bias`` through both public APIs of one in-process gateway: the official
``openai`` client over HTTP (plain, streamed, and its ``parse`` helper with a pydantic model) and the
gRPC ``GatewayService``, with real encoder and decoder cores of the tiny checkpoint behind them. Its
weights are random: the answers are valid JSON only because the grammar forces it."""

from __future__ import annotations

import json
from typing import Literal

import grpc
import jsonschema
import openai
import pydantic
import pytest
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.intake import response_format
from gateway.tenancy.config import Tenant, TenantLimits
from services.common.errors import InvalidArgument
from services.decoder.engine.response_format import ResponseFormat
from tests.support.gateway import MODEL, make_gateway
from tests.support.gateway_servers import GatewayServers

TIMEOUT_S = 60
ORDER = {
    "type": "object",
    "properties": {
        "item": {"enum": ["tea", "coffee", "water"]},
        "size": {"enum": ["S", "M", "L"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 12},
        "to_go": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["item", "size", "count", "to_go", "note"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}


@pytest.fixture(scope="module")
def servers(cores):
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    with GatewayServers(
        make_gateway(cores, KeyStore(None), LocalLimiter(), default_timeout_s=TIMEOUT_S)
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.http_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def stub(servers):
    with grpc.insecure_channel(servers.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def ask(text: str = "One order, please, as JSON.") -> list[dict]:
    return [{"role": "user", "content": text}]


# -- HTTP, the openai client --------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "sampled"]
)
def test_json_schema_answers_validate_plain_and_streamed(client, sampling):
    kw = {"model": MODEL, "messages": ask(), "max_tokens": 120, "response_format": SCHEMA_FORMAT, **sampling}
    answer = client.chat.completions.create(**kw)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), ORDER)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content  # greedy, or the same seed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]


def test_json_object_answers_are_objects(client):
    answers = [
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Any JSON object."),
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        for seed in (8, 9)
    ]
    finished = [a for a in answers if a.choices[0].finish_reason == "stop"]
    assert finished  # random weights may also write on until max_tokens
    for a in finished:
        assert isinstance(json.loads(a.choices[0].message.content), dict)


class Order(pydantic.BaseModel):
    item: Literal["tea", "coffee", "water"]
    count: int = pydantic.Field(ge=1, le=12)
    to_go: bool
    note: str = pydantic.Field(max_length=8)


def test_the_openai_parse_helper_gets_its_model_back(client):
    """``client.chat.completions.parse`` sends the strict schema it derives from a pydantic model and
    parses the answer into that model."""
    got = client.chat.completions.parse(
        model=MODEL, messages=ask(), max_tokens=200, temperature=1.0, seed=3, response_format=Order
    )
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(got.choices[0].message.parsed, Order)


def test_logit_bias_over_http(client):
    plain = client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=4, temperature=0)
    token = 321
    forced = client.chat.completions.create(
        model=MODEL,
        messages=ask("Hi"),
        max_tokens=4,
        temperature=0,
        logit_bias={str(token): 100},
        logprobs=True,
    )
    assert forced.choices[0].message.content != plain.choices[0].message.content
    assert len({lp.token for lp in forced.choices[0].logprobs.content}) == 1  # the one biased token, 4 times


@pytest.mark.parametrize(
    "extra,code",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format_invalid",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "bad name", "schema": ORDER},
                }
            },
            "response_format_invalid",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format_invalid",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format_invalid"),
        ({"logit_bias": {"5": 101}}, "logit_bias_out_of_range"),
        ({"logit_bias": {"1024": 1}}, "logit_bias_unknown_token"),
        ({"logit_bias": {"five": 1}}, "logit_bias_invalid"),
    ],
    ids=[
        "schema-does-not-compile",
        "name-invalid",
        "schema-missing",
        "type-unknown",
        "bias-101",
        "bias-unknown-token",
        "bias-key-not-an-id",
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_structured_requests_are_400_before_any_stream(client, extra, code, stream):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=ask(), max_tokens=4, stream=stream, extra_body=extra
        )
    assert err.value.code == code, err.value.body


# -- gRPC ---------------------------------------------------------------------------------------


def grpc_chat(**fields) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(
        model=MODEL,
        messages=[
            gateway_pb2.ChatMessage(role="user", content=[gateway_pb2.Part(text="One order, please.")])
        ],
        **fields,
    )


def test_json_schema_over_grpc(stub, client):
    fmt = gateway_pb2.ResponseFormat(
        type=gateway_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=gateway_pb2.JsonSchema(name="order", schema=json.dumps(ORDER), strict=True),
    )
    chunks = list(stub.Chat(grpc_chat(max_tokens=120, response_format=fmt), timeout=TIMEOUT_S))
    assert chunks[-1].finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    jsonschema.validate(json.loads(text), ORDER)
    http = client.chat.completions.create(
        model=MODEL,
        messages=ask("One order, please."),
        max_tokens=120,
        temperature=0,
        response_format=SCHEMA_FORMAT,
    )
    assert http.choices[0].message.content == text  # greedy: the same answer on both APIs


def test_logit_bias_and_refusals_over_grpc(stub):
    chunks = list(stub.Chat(grpc_chat(max_tokens=3, logit_bias={321: 100.0}), timeout=TIMEOUT_S))
    assert len({c.text for c in chunks if c.text}) == 1
    bad = gateway_pb2.ResponseFormat(
        type=gateway_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=gateway_pb2.JsonSchema(name="x", schema='{"type": "string", "pattern": "(("}'),
    )
    for fields, reason in [
        ({"response_format": bad}, "response_format_invalid"),
        ({"logit_bias": {3: -250.0}}, "logit_bias_out_of_range"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Chat(grpc_chat(max_tokens=4, **fields), timeout=TIMEOUT_S))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata())["x-error-reason"] == reason


# -- the tenant's limits ------------------------------------------------------------------------


def test_a_tenant_bounds_the_schema_and_its_compile_budget():
    tenant = Tenant(name="t", limits=TenantLimits(max_schema_bytes=100, max_grammar_compile_ms=250))
    small = ResponseFormat.json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}}}
    )  # 51 bytes
    assert tenant.bound_response_format(small).max_compile_ms == 250
    assert tenant.bound_response_format(ResponseFormat(small.kind, small.schema, 40)).max_compile_ms == 40
    assert tenant.bound_response_format(ResponseFormat.json_object()).max_compile_ms == 250
    with pytest.raises(InvalidArgument) as err:
        tenant.bound_response_format(ResponseFormat.json_schema(ORDER))
    assert err.value.reason == "response_format_too_large"
    assert Tenant(name="d").limits.max_schema_bytes == 32 * 1024  # the default


def test_text_is_no_format_and_names_follow_openais_rule():
    assert response_format("text") is None
    assert response_format("json_schema", "a-B_9" * 12 + "abcd", ORDER).kind == "json_schema"
    for name in ["", "a" * 65, "with space", "ü"]:
        with pytest.raises(InvalidArgument):
            response_format("json_schema", name, ORDER)


async def test_the_internal_decode_door_applies_the_tenants_bounds(cores):
    """``DecoderService/Generate`` through the gateway's internal door: the tenant's schema size and
    compile budget hold there as for chat, and a good schema still gets its document."""
    from gateway.internal import Caller, InternalDoor
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter
    from services.decoder.types import ChatMessage, DecodeRequest, SamplingParams, TextContent

    limits = TenantLimits(max_schema_bytes=40_000, max_grammar_compile_ms=20)
    keys = KeyStore(None, single_tenant_default=Tenant(name="default", limits=limits))
    door = InternalDoor(make_gateway(cores, keys, LocalLimiter(), default_timeout_s=TIMEOUT_S))
    entry = await door.enter(Caller(None), "decode")

    def request(schema) -> DecodeRequest:
        sampling = SamplingParams(temperature=0.0, response_format=ResponseFormat.json_schema(schema))
        return DecodeRequest([ChatMessage("user", [TextContent("One order.")])], sampling, 120)

    events = [e async for e in door.generate(entry, request(ORDER), [])]
    jsonschema.validate(json.loads("".join(e.text for e in events)), ORDER)
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(1000)}}  # 30 kB
    with pytest.raises(InvalidArgument) as err:
        _ = [e async for e in door.generate(entry, request(wide), [])]
    assert err.value.reason == "response_format_too_complex"  # over 100 ms to compile, the budget is 20
    with pytest.raises(InvalidArgument) as err:
        _ = [e async for e in door.generate(entry, request({"enum": ["x" * 1000] * 41}), [])]
    assert err.value.reason == "response_format_too_large"
