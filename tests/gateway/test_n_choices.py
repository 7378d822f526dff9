"""``n`` > 1 through both public APIs of one in-process gateway: the official ``openai`` client over
HTTP (plain and streamed) and the gRPC ``GatewayService``, real encoder and decoder cores of the tiny
checkpoint behind them. The prompt counts once in usage, the choices' completions add up; each choice
has its index and its own finish reason; ``n`` over the tenant's ``max_n`` is a 400 / INVALID_ARGUMENT
before any work, and admission reserves ``n`` x ``max_tokens``."""

from __future__ import annotations

import base64
import json

import grpc
import httpx
import jsonschema
import openai
import pytest
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.tenancy.config import Tenant, TenantLimits
from tests.support.gateway import MODEL, make_gateway
from tests.support.gateway_servers import GatewayServers
from tests.support.images import png

TIMEOUT_S = 60
MAX_N = 4  # the tenant's cap in this module
FORCED = {"321": 100}  # one token forced: every choice runs to max_tokens, whatever the weights
IMG = "data:image/png;base64," + base64.b64encode(png(64, 64, seed=5)).decode()


@pytest.fixture(scope="module")
def servers(cores):
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    limits = TenantLimits(requests_per_s=1000, max_concurrent=100, tokens_per_min=2000, max_n=MAX_N)
    keys = KeyStore(None, single_tenant_default=Tenant(name="default", limits=limits))
    with GatewayServers(make_gateway(cores, keys, LocalLimiter(), default_timeout_s=TIMEOUT_S)) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.http_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def stub(servers):
    with grpc.insecure_channel(servers.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def ask(text="Tell me about the sea."):
    return [{"role": "user", "content": text}]


def test_non_streamed_choices_count_the_prompt_once(client):
    one = client.chat.completions.create(
        model=MODEL, messages=ask(), max_tokens=5, temperature=0, logit_bias=FORCED
    )
    three = client.chat.completions.create(
        model=MODEL, messages=ask(), max_tokens=5, temperature=0, logit_bias=FORCED, n=3, logprobs=True
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy
    assert all(c.finish_reason == "length" and len(c.logprobs.content) == 5 for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # once, not three times
    assert three.usage.completion_tokens == 3 * 5
    assert three.usage.total_tokens == one.usage.prompt_tokens + 15


def test_greedy_choices_with_an_image(client):
    content = [{"type": "image_url", "image_url": {"url": IMG}}, {"type": "text", "text": "What is it?"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content
    # the request's own prefix-cache hits (the chat template's head, at most), not those of the choice
    # that found the image in the blocks its sibling had just prefilled
    shared = (answer.usage.prompt_tokens - 1) // 16 * 16
    assert answer.usage.prompt_tokens_details.cached_tokens < shared - 256


def test_streamed_choices_carry_their_indices_and_end_with_usage(client):
    kw = {"model": MODEL, "messages": ask("A poem, please."), "max_tokens": 6, "temperature": 1.0, "seed": 7}
    plain = client.chat.completions.create(n=3, **kw)
    chunks = list(
        client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw)
    )
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert sorted(texts) == [0, 1, 2]
    assert texts == {c.index: c.message.content for c in plain.choices}  # the same seed, the same choices
    assert finishes == {c.index: [c.finish_reason] for c in plain.choices}  # one finish chunk per choice
    assert len(set(texts.values())) == 3  # seed s + k: the choices differ
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )


def test_n_over_the_tenants_cap_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=4, n=MAX_N + 1)
    error = err.value.body
    assert err.value.status_code == 400 and error["code"] == "n_out_of_range"
    assert error["message"] == f"n must be in 1..{MAX_N}, got {MAX_N + 1}"


@pytest.mark.parametrize("n", [0, -3])
def test_n_below_one_is_a_400(servers, n):
    body = {"model": MODEL, "messages": ask(), "max_tokens": 4, "n": n}
    r = httpx.post(servers.http_url + "/chat/completions", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 400 and r.json()["error"]["code"] == "n_out_of_range"


def test_admission_reserves_n_times_max_tokens(client):
    """The tenant's 2000 tokens a minute admit one choice of 600 tokens, not four."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=600, n=4)
    assert err.value.body["code"] == "tokens_per_min_exceeded"
    assert "n x max_tokens" in err.value.body["message"]


# -- gRPC ---------------------------------------------------------------------------------------


def test_grpc_choices_match_http(client, stub):
    kw = {"max_tokens": 5, "temperature": 1.0, "seed": 3}
    answer = client.chat.completions.create(model=MODEL, messages=ask(), n=3, **kw)
    request = gateway_pb2.ChatRequest(
        model=MODEL,
        messages=[gateway_pb2.ChatMessage(role="user", content=[gateway_pb2.Part(text=ask()[0]["content"])])],
        n=3,
        **kw,
    )
    messages = list(stub.Chat(request, timeout=TIMEOUT_S))
    texts: dict[int, str] = {}
    for m in messages:
        texts[m.index] = texts.get(m.index, "") + m.text
    assert texts == {c.index: c.message.content for c in answer.choices}
    ends = [(m.index, m.finish_reason) for m in messages if m.finish_reason]
    assert sorted(ends) == sorted((c.index, c.finish_reason) for c in answer.choices)
    assert [m.HasField("usage") for m in messages].count(True) == 1 and messages[-1].HasField("usage")
    usage = messages[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )


@pytest.mark.parametrize("n", [MAX_N + 1, -1])
def test_grpc_n_out_of_range_is_invalid_argument(stub, n):
    request = gateway_pb2.ChatRequest(
        model=MODEL,
        messages=[gateway_pb2.ChatMessage(role="user", content=[gateway_pb2.Part(text="Hi")])],
        max_tokens=4,
        n=n,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(request, timeout=TIMEOUT_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"n must be in 1..{MAX_N}, got {n}"


def test_the_default_cap_is_8_and_the_mesh_bound_16():
    assert Tenant(name="d").limits.max_n == 8
    assert TenantLimits.generous().max_n == 16


SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["cat", "dog", "bird"]}, "count": {"type": "integer", "maximum": 9}},
    "required": ["label", "count"],
    "additionalProperties": False,
}


def test_each_choice_is_held_to_the_response_format(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=ask("JSON, please."),
        max_tokens=60,
        temperature=1.0,
        seed=4,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}},
    )
    assert [c.finish_reason for c in answer.choices] == ["stop"] * 3
    for c in answer.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


async def test_the_internal_decode_door_applies_the_tenants_cap(cores):
    """``DecoderService/Generate`` through the gateway's internal door: ``n`` within the tenant's
    ``max_n``, each choice's events tagged with its index, the usage record counting the prompt once."""
    from gateway.internal import Caller, InternalDoor
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter
    from services.common.errors import InvalidArgument
    from services.decoder.types import ChatMessage, DecodeRequest, SamplingParams, TextContent

    records = []

    class Records:
        def on_complete(self, record):
            records.append(record)

    keys = KeyStore(None, single_tenant_default=Tenant(name="default", limits=TenantLimits(max_n=3)))
    gateway = make_gateway(cores, keys, LocalLimiter(), default_timeout_s=TIMEOUT_S)
    gateway.observers.append(Records())
    door = InternalDoor(gateway)
    entry = await door.enter(Caller(None), "decode")
    sampling = SamplingParams(temperature=0.0, logit_bias={321: 100.0})
    request = DecodeRequest([ChatMessage("user", [TextContent("Hello there.")])], sampling, 4, n=3)
    events = [e async for e in door.generate(entry, request, [])]
    assert sorted({e.index for e in events}) == [0, 1, 2]
    last = [e for e in events if e.finished]
    assert len(last) == 3 and all(e.usage.completion_tokens == 4 for e in last)
    (record,) = records
    assert (record.prompt_tokens, record.completion_tokens) == (last[0].usage.prompt_tokens, 12)
    with pytest.raises(InvalidArgument) as err:
        _ = [e async for e in door.generate(entry, DecodeRequest(request.messages, sampling, 4, n=4), [])]
    assert err.value.reason == "n_out_of_range"
