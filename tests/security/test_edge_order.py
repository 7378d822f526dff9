"""The edge in the right order: who asks before what they sent, counting before decoding, every check
before any image is embedded, and encoded tiles paid for even when the request ends early. A real
gateway (tiny checkpoint's encoder and decoder in process) whose ASGI app is driven directly, so the
test counts every byte the app asks for with ``receive()``; real Redis for the token budget."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator

import pytest
import yaml

from tests.support.gateway import MODEL, make_gateway
from tests.support.images import png
from tests.support.ports import free_port
from tests.support.shared_redis import redis_url

MIB = 1 << 20


class Counting:
    """An encoder client that counts the calls it passes on."""

    def __init__(self, inner):
        self.inner, self.calls, self.done = inner, 0, asyncio.Event()

    async def embed(self, images, ctx, inline=False):
        self.calls += 1
        refs = await self.inner.embed(images, ctx, inline)
        self.done.set()
        return refs


@pytest.fixture(scope="module")
async def encoder(tiny_checkpoint):
    """An encoder of this module's own, started and closed on the loop the test drives the app on."""
    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore, PreprocessorTileSource
    from services.preprocess.pipeline import Preprocessor

    with Preprocessor() as pre:
        core = EncoderCore.from_config(
            EncoderConfig(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", fallback="inline"),
            tile_source=PreprocessorTileSource(pre),
        )
        yield core
        await core.close()


@pytest.fixture(scope="module")
def edge(cores, encoder, tmp_path_factory):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore, create_key
    from gateway.tenancy.limiter import RedisLimiter

    key, entry = create_key("acme")
    path = tmp_path_factory.mktemp("edge") / "tenants.yaml"
    limits = {"requests_per_s": 1000, "max_images_per_request": 8, "max_tokens_per_request": 1_000_000}
    path.write_text(yaml.safe_dump({"tenants": [{"name": "acme", "limits": limits}],
                                    "keys": [entry.model_dump(mode="json")]}))  # fmt: skip
    limiter = RedisLimiter.from_url(redis_url("security"), prefix=f"ivm:lim:edge{free_port()}:")
    gateway = make_gateway({**cores, "encoder": encoder}, KeyStore(str(path)), limiter)
    route = gateway.routes[MODEL]
    route.encoder = Counting(route.encoder)
    return {
        "app": create_http_app(gateway),
        "gateway": gateway,
        "key": key,
        "encoder": route.encoder,
        "limiter": limiter,
    }


async def _post(app, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """POST /v1/chat/completions through the ASGI app: (status, JSON body, bytes the app received)."""
    received = 0

    async def receive():
        nonlocal received
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        received += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body or b"{}"), received


def _slices(data: bytes, size: int = MIB) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def _zeros(total: int) -> Iterator[bytes]:
    return (b"0" * MIB for _ in range(total // MIB))


def _body(images: int, image_bytes: int = 64, **fields) -> bytes:
    uri = "data:image/png;base64," + base64.b64encode(png(448, 448, seed=5) + b"\0" * image_bytes).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}} for _ in range(images)]
    content.append({"type": "text", "text": "What is it?"})
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


@pytest.fixture
def decodes(monkeypatch):
    """Counts the data URIs the HTTP API decodes (the real decoder runs)."""
    import gateway.openai_schema as schema

    calls = []
    real = schema.decode_data_uri
    monkeypatch.setattr(schema, "decode_data_uri", lambda url: calls.append(1) or real(url))
    return calls


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
async def test_an_unauthenticated_body_is_never_read(edge, decodes, announce):
    body = _body(3, image_bytes=20 * MIB)  # ~84 MB of JSON, three 20 MB images
    headers = {"content-type": "application/json"}
    if announce:
        headers["content-length"] = str(len(body))
    status, answer, received = await _post(edge["app"], headers, _slices(body))
    assert status == 401 and answer["error"]["code"] == "missing_api_key"
    assert received < MIB and decodes == []


async def test_an_oversized_body_of_a_tenant_is_refused_by_its_length_or_as_it_passes_the_bound(edge):
    from gateway.http_api import MAX_BODY_BYTES

    auth = {"authorization": f"Bearer {edge['key']}"}
    announced = {**auth, "content-length": str(MAX_BODY_BYTES + 1)}
    status, answer, received = await _post(edge["app"], announced, _zeros(MAX_BODY_BYTES + MIB))
    assert (status, answer["error"]["code"], received) == (413, "body_too_large", 0)
    status, answer, received = await _post(edge["app"], auth, _zeros(MAX_BODY_BYTES + 8 * MIB))
    assert (status, answer["error"]["code"]) == (413, "body_too_large")
    assert received <= MAX_BODY_BYTES + MIB


async def test_images_are_counted_before_any_is_decoded(edge, decodes):
    auth = {"authorization": f"Bearer {edge['key']}"}
    status, answer, _ = await _post(edge["app"], auth, _slices(_body(9)))
    assert (status, answer["error"]["code"]) == (400, "too_many_images")
    assert decodes == []


async def test_nothing_is_embedded_before_the_prompt_is_known_to_fit_the_context(edge):
    auth = {"authorization": f"Bearer {edge['key']}"}
    before = edge["encoder"].calls
    room = edge["gateway"].routes[MODEL].max_model_len - 100  # fits alone, not after a 256-token image
    status, answer, _ = await _post(edge["app"], auth, _slices(_body(1, max_tokens=room)))
    assert (status, answer["error"]["code"]) == (400, "context_length_exceeded"), answer
    assert edge["encoder"].calls == before


async def test_nothing_is_embedded_before_the_sampling_values_are_checked(edge):
    """The gRPC API's messages carry any float: the gateway checks sampling before the encoder works."""
    from gateway.types import ChatRequest, ImagePart, Message, TextPart
    from services.common.errors import InvalidArgument

    gateway, before = edge["gateway"], edge["encoder"].calls
    image = ImagePart(png(448, 448, seed=6), None)
    req = ChatRequest(MODEL, [Message("user", [image, TextPart("hi")])], frequency_penalty=7.0)
    with pytest.raises(InvalidArgument, match="frequency_penalty"):
        async for _ in gateway.chat(req, await gateway.authenticate(edge["key"])):
            pass
    assert edge["encoder"].calls == before


async def test_a_request_that_ends_after_its_images_were_encoded_pays_for_them(edge):
    """The client goes away after the encoder has worked and before the decoder's first token: the
    tenant's daily budget is charged the image tokens encoded, not refunded to zero."""
    from datetime import UTC, datetime

    from gateway.tenancy.limiter import utc_day

    limiter, encoder = edge["limiter"], edge["encoder"]
    day_key = limiter.keys("acme", utc_day(datetime.now(UTC)))["day"]
    before = int(await limiter.client.get(day_key) or 0)
    encoder.done.clear()
    auth = {"authorization": f"Bearer {edge['key']}"}
    body = _body(1, image_bytes=1, max_tokens=64, temperature=0)
    task = asyncio.create_task(_post(edge["app"], auth, _slices(body)))
    await asyncio.wait_for(encoder.done.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):  # the refund runs as the request's generator closes
        charged = int(await limiter.client.get(day_key) or 0) - before
        if charged < 64 + 256:
            break
        await asyncio.sleep(0.05)
    assert charged >= 256  # one 448x448 image: one tile, 256 image tokens
