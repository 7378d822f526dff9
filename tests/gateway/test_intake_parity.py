"""One intake path: the same request refused the same way over HTTP and over the public gRPC API.

Each case is written once, as a conversation, and sent through both APIs of one in-process gateway
(real HTTP with httpx, a real gRPC channel; real encoder and decoder cores behind them). The HTTP status
must be the gRPC code's counterpart, and HTTP's ``error.code`` / ``error.message`` must be gRPC's
``x-error-reason`` trailer / details: one check, written once, under both APIs. Two gateways: single
tenant (no tenants file: the mesh's own bounds, 16 images, 128 tiles, n 16) and tenant mode (a key per
tenant; the tenant's default caps, 8 images, 48 tiles, max_tokens 4096, n 8).
"""

from __future__ import annotations

import base64
import json

import grpc
import httpx
import pytest
import yaml
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support.gateway import MODEL, local_cores, make_gateway
from tests.support.gateway_servers import GatewayServers
from tests.support.images import handmade_png, png

TIMEOUT_S = 60
IMG = png(64, 64, seed=3)  # one tile
THIRTEEN = handmade_png(1792, 1344)  # header only: 4x3 grid + thumbnail at max_num 12, never decoded
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


# -- one request, two wire formats ------------------------------------------------------------------


def user(*parts):
    return ("user", list(parts))


def conv(*messages, **fields) -> dict:
    """A request in neutral form: messages as (role, [text str | image bytes]) plus request fields."""
    return {"messages": list(messages), "fields": {"model": MODEL, "max_tokens": 4, **fields}}


def http_body(request: dict) -> dict:
    def part(p):
        if isinstance(p, str):
            return {"type": "text", "text": p}
        return {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()},
        }

    messages = [{"role": role, "content": [part(p) for p in parts]} for role, parts in request["messages"]]
    fields = dict(request["fields"])
    if "response_format" in fields:  # (name, schema): a json_schema format
        name, schema = fields["response_format"]
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if "logit_bias" in fields:  # OpenAI's keys are token ids as strings
        fields["logit_bias"] = {str(k): v for k, v in fields["logit_bias"].items()}
    return {"messages": messages, "temperature": 0, **fields}


def grpc_request(request: dict) -> gateway_pb2.ChatRequest:
    def part(p):
        if isinstance(p, str):
            return gateway_pb2.Part(text=p)
        return gateway_pb2.Part(image=gateway_pb2.Image(data=p))

    messages = [
        gateway_pb2.ChatMessage(role=role, content=[part(p) for p in parts])
        for role, parts in request["messages"]
    ]
    fields = dict(request["fields"])
    if "response_format" in fields:
        name, schema = fields["response_format"]
        fields["response_format"] = gateway_pb2.ResponseFormat(
            type=gateway_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=gateway_pb2.JsonSchema(name=name, schema=json.dumps(schema)),
        )
    return gateway_pb2.ChatRequest(messages=messages, **fields)


HI = user("Say hi.")
WIDE = {"type": "object", "properties": {f"p{i:04d}": {"type": "string"} for i in range(1500)}}  # 41 kB
HUGE = {"enum": ["x" * 1000] * 300}  # 300 kB

# (id, request, HTTP status, reason); every case runs in both modes unless its id says which.
CASES = [
    ("messages-empty", conv(), 400, "messages_empty"),
    ("messages-too-many", conv(*[user("a")] * 257), 400, "too_many_messages"),
    ("user-content-empty", conv(user()), 400, "empty_content"),
    ("system-content-empty", conv(("system", []), HI), 400, "empty_content"),
    ("role-unknown", conv(("tool", ["42"]), HI), 400, "invalid_role"),
    ("image-in-system-message", conv(("system", [IMG]), HI), 400, "image_not_in_user_message"),
    (
        "image-in-assistant-message",
        conv(HI, ("assistant", ["Hello.", IMG]), HI),
        400,
        "image_not_in_user_message",
    ),
    ("last-message-assistant", conv(HI, ("assistant", ["Hello."])), 400, "last_message_from_assistant"),
    ("text-over-byte-bound", conv(user("x" * (1024 * 1024 + 1))), 400, "prompt_too_long"),
    ("top-logprobs-without-logprobs", conv(HI, top_logprobs=3), 400, "invalid_parameter"),
    ("top-logprobs-over-bound", conv(HI, logprobs=True, top_logprobs=21), 400, "invalid_parameter"),
    ("max-tokens-over-context", conv(HI, max_tokens=100_000), 400, "max_tokens_out_of_range"),
    ("n-negative", conv(HI, n=-1), 400, "n_out_of_range"),
    ("single/n-over-mesh-bound", conv(HI, n=17), 400, "n_out_of_range"),
    ("tenant/n-over-tenant-cap", conv(HI, n=9), 400, "n_out_of_range"),
    ("model-unknown", conv(HI, model="gpt-4o"), 404, "model_not_found"),
    (
        "schema-does-not-compile",
        conv(HI, response_format=("x", {"type": "foo"})),
        400,
        "response_format_invalid",
    ),
    ("schema-name-invalid", conv(HI, response_format=("a b", {})), 400, "response_format_invalid"),
    ("schema-over-mesh-bound", conv(HI, response_format=("x", HUGE)), 400, "response_format_too_large"),
    (
        "tenant/schema-over-tenant-bound",
        conv(HI, response_format=("x", WIDE)),
        400,
        "response_format_too_large",
    ),
    ("logit-bias-out-of-range", conv(HI, logit_bias={5: -100.5}), 400, "logit_bias_out_of_range"),
    ("logit-bias-unknown-token", conv(HI, logit_bias={1024: 1.0}), 400, "logit_bias_unknown_token"),
    ("logit-bias-too-many", conv(HI, logit_bias={i: 1.0 for i in range(301)}), 400, "logit_bias_invalid"),
    ("single/images-over-16", conv(user(*[IMG] * 17, "What are they?")), 400, "too_many_images"),
    ("single/tiles-over-128", conv(user(*[THIRTEEN] * 10, "What are they?")), 400, "too_many_tiles"),
    ("tenant/images-over-8", conv(user(*[IMG] * 9, "What are they?")), 400, "too_many_images"),
    ("tenant/tiles-over-48", conv(user(*[THIRTEEN] * 4, "What are they?")), 400, "too_many_tiles"),
    ("tenant/max-tokens-over-tenant-cap", conv(HI, max_tokens=4097), 400, "max_tokens_out_of_range"),
    ("tenant/model-not-allowed", conv(HI, model="other"), 404, "model_not_found"),
    ("tenant/key-missing", conv(HI), 401, "missing_api_key"),
    ("tenant/key-wrong", conv(HI), 401, "invalid_api_key"),
]


def _cases():
    out = []
    for case_id, request, status, reason in CASES:
        modes = [case_id.split("/")[0]] if "/" in case_id else ["single", "tenant"]
        for mode in modes:
            name = case_id if "/" in case_id else f"{mode}/{case_id}"
            out.append(pytest.param(mode, request, status, reason, id=name))
    return out


# -- the gateways -----------------------------------------------------------------------------------


def _tenants_file(path) -> dict[str, str]:
    from gateway.tenancy.keys import create_key

    key, entry = create_key("acme")
    doc = {
        # Rates out of the way; the per-request caps are TenantLimits' defaults (8 images, 48 tiles).
        "tenants": [{"name": "acme", "allowed_models": [MODEL], "limits": {"requests_per_s": 1000}}],
        "keys": [entry.model_dump(mode="json")],
    }
    path.write_text(yaml.safe_dump(doc))
    return {"acme": key}


@pytest.fixture(scope="module")
def single(cores):
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    with GatewayServers(
        make_gateway(cores, KeyStore(None), LocalLimiter(), default_timeout_s=TIMEOUT_S)
    ) as s:
        yield {"servers": s, "key": None}


@pytest.fixture(scope="module")
def tenant(tiny_checkpoint, tmp_path_factory):
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    path = tmp_path_factory.mktemp("parity-tenants") / "tenants.yaml"
    keys = _tenants_file(path)
    # Cores of its own: the cores' queues belong to the event loop that first uses them.
    with local_cores(tiny_checkpoint) as cores:
        gateway = make_gateway(cores, KeyStore(path), LocalLimiter(), default_timeout_s=TIMEOUT_S)
        with GatewayServers(gateway) as s:
            yield {"servers": s, "key": keys["acme"]}


@pytest.fixture(scope="module")
def apis(single, tenant):
    out = {}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        channels = []
        for name, gw in (("single", single), ("tenant", tenant)):
            channel = grpc.insecure_channel(gw["servers"].grpc_target)
            channels.append(channel)
            out[name] = {
                "url": gw["servers"].http_url,
                "http": http,
                "stub": gateway_pb2_grpc.GatewayServiceStub(channel),
                "key": gw["key"],
            }
        yield out
        for channel in channels:
            channel.close()


def _key_for(case_id: str, key: str | None) -> str | None:
    if case_id.endswith("key-missing"):
        return None
    if case_id.endswith("key-wrong"):
        return "ivm-nosuchkey-" + "x" * 43
    return key


def _post(api: dict, body: dict, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return api["http"].post(f"{api['url']}/chat/completions", json=body, headers=headers)


def _chat(api: dict, request: gateway_pb2.ChatRequest, key: str | None) -> list[gateway_pb2.ChatResponse]:
    metadata = [("authorization", f"Bearer {key}")] if key else []
    return list(api["stub"].Chat(request, metadata=metadata, timeout=TIMEOUT_S))


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,request_,status,reason", _cases())
def test_the_same_refusal_on_both_apis(apis, request, mode, request_, status, reason):
    api = apis[mode]
    key = _key_for(request.node.callspec.id, api["key"])
    r = _post(api, http_body(request_), key)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == reason, error
    with pytest.raises(grpc.RpcError) as err:
        _chat(api, grpc_request(request_), key)
    assert err.value.code() == STATUS[status], err.value.details()
    assert dict(err.value.trailing_metadata())["x-error-reason"] == reason
    assert err.value.details() == error["message"]


def test_key_in_x_api_key_works_on_both_apis(apis):
    api = apis["tenant"]
    request_ = conv(HI, max_tokens=1)
    r = api["http"].post(
        f"{api['url']}/chat/completions", json=http_body(request_), headers={"x-api-key": api["key"]}
    )
    assert r.status_code == 200, r.text[:500]
    chunks = list(
        api["stub"].Chat(grpc_request(request_), metadata=[("x-api-key", api["key"])], timeout=TIMEOUT_S)
    )
    assert chunks[-1].usage.completion_tokens == 1


# -- answers ------------------------------------------------------------------------------------------


def test_grpc_carries_top_logprobs_and_cached_tokens_as_http_does(apis):
    """Greedy, so both APIs generate the same tokens: the same top logprobs per token, and (the prompt
    having been seen before) the same count of prompt tokens served from the prefix cache."""
    api = apis["single"]
    request_ = conv(
        user("Describe a quiet harbour at dawn in a few careful words."), logprobs=True, top_logprobs=3
    )
    assert _post(api, http_body(request_), None).status_code == 200  # warms the prefix cache
    r = _post(api, http_body(request_), None)
    assert r.status_code == 200, r.text[:500]
    answer = r.json()
    chunks = _chat(api, grpc_request(request_), None)
    grpc_lps = [lp for c in chunks for lp in c.logprobs]
    http_lps = answer["choices"][0]["logprobs"]["content"]
    assert len(grpc_lps) == len(http_lps) == 4
    for ours, theirs in zip(grpc_lps, http_lps, strict=True):
        assert ours.token == theirs["token"] and list(ours.token_bytes) == theirs["bytes"]
        assert ours.logprob == pytest.approx(theirs["logprob"], abs=1e-4)
        assert len(ours.top_logprobs) == len(theirs["top_logprobs"]) == 3
        for top, expected in zip(ours.top_logprobs, theirs["top_logprobs"], strict=True):
            assert top.token == expected["token"] and list(top.token_bytes) == expected["bytes"]
            assert top.logprob == pytest.approx(expected["logprob"], abs=1e-4)
    cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert chunks[-1].usage.cached_prompt_tokens == cached
