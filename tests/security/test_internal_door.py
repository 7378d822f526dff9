"""The one door for internal clients, on the real mesh (Ray Serve, a Redis of the module's own, real gRPC
to the gateway's port): the preprocess, encoder and decoder APIs answer through the gateway to keys with
the right scope only, the context a client writes into its message is ignored (identity, namespace and
priority come from the credential), references resolve only in the caller's own namespace, and every
call is admitted, limited and billed like a chat request."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from internvl.common.v1 import common_pb2
from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from typer.testing import CliRunner

from services.common.refs import key_namespace
from tests.support.images import png
from tests.support.mesh import deployed, one_model_mesh_config
from tests.support.own_redis import OwnRedis
from tests.support.ports import free_port

pytestmark = pytest.mark.ray

MODEL = "door"
GENEROUS = {"requests_per_s": 1000, "max_concurrent": 64}
# One tile of the tiny checkpoint is 256 rows of 64 fp32 values (65,536 bytes): one-tile images go to
# the shared cache, a three-tile image does not (the encoder answers it with a Ray object reference).
MAX_ENTRY_BYTES = 100_000
KEYS = {  # name: (tenant, scopes)
    "alpha_embed": ("alpha", ["embed"]),
    "alpha_decode": ("alpha", ["decode"]),
    "alpha_tile": ("alpha", ["tile"]),
    "alpha_chat": ("alpha", []),  # no --scope: chat, as every key made before scopes existed
    "beta_all": ("beta", ["embed", "decode", "chat"]),
    "gamma_tile": ("gamma", ["tile"]),
}


def _tenants_file(path) -> dict[str, str]:
    """The tenants, then each key made by ``internvl-mesh keys create`` (with ``--scope``)."""
    from mesh.ops_cli import keys_app

    tenants = [
        {"name": "alpha", "allowed_models": [MODEL], "limits": GENEROUS},
        {"name": "beta", "limits": GENEROUS, "priority": 1},
        # gamma: one image per request, one request and then (almost) no more
        {"name": "gamma", "limits": {"requests_per_s": 0.001, "burst": 1, "max_images_per_request": 1}},
    ]
    path.write_text(json.dumps({"tenants": tenants, "keys": []}))
    made = {}
    for name, (tenant, scopes) in KEYS.items():
        args = ["create", "-f", str(path), "--tenant", tenant, "--key-id", name]
        out = CliRunner().invoke(keys_app, args + [a for s in scopes for a in ("--scope", s)])
        assert out.exit_code == 0, out.output
        made[name] = out.stdout.strip()
    return made


@pytest.fixture(scope="module")
def door(ray_serve, tiny_checkpoint, tmp_path_factory):
    own = OwnRedis().start()
    path = tmp_path_factory.mktemp("door") / "tenants.yaml"
    keys = _tenants_file(path)
    grpc_port = free_port()
    cfg = one_model_mesh_config(
        ray_serve["http_port"],
        tiny_checkpoint,
        MODEL,
        gateway={"grpc_port": grpc_port, "tenants_file": str(path)},
        redis={"url": own.url},
        cache={"max_entry_bytes": MAX_ENTRY_BYTES},
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        with deployed(cfg):
            yield {
                "channel": channel,
                "keys": keys,
                "redis": redis.Redis(port=own.port),
                "http": f"http://127.0.0.1:{ray_serve['http_port']}/v1",
            }
    finally:
        channel.close()
        own.kill()


def _auth(key: str | None, **extra: str) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {key}")] if key else []
    return md + list(extra.items())


def _embed(door, key, images, *, inline=False, context=None, **extra):
    stub = encoder_pb2_grpc.EncoderServiceStub(door["channel"])
    request = encoder_pb2.EmbedImagesRequest(
        images=[encoder_pb2.ImageSource(data=data) for data in images], return_inline=inline, context=context
    )
    return stub.EmbedImages(request, metadata=_auth(key, **extra), timeout=120).embeddings


def _generate(door, key, refs, max_tokens=3):
    stub = decoder_pb2_grpc.DecoderServiceStub(door["channel"])
    content = [decoder_pb2.ContentPart(image_index=i) for i in range(len(refs))]
    request = decoder_pb2.GenerateRequest(
        messages=[
            decoder_pb2.Message(role="user", content=[*content, decoder_pb2.ContentPart(text="What?")])
        ],
        images=refs,
        sampling=decoder_pb2.SamplingParams(max_tokens=max_tokens),
    )
    return list(stub.Generate(request, metadata=_auth(key), timeout=120))


def _tile(door, key, images):
    stub = preprocess_pb2_grpc.PreprocessServiceStub(door["channel"])
    request = preprocess_pb2.TileImagesRequest(images=[preprocess_pb2.ImageInput(data=d) for d in images])
    return stub.TileImages(request, metadata=_auth(key), timeout=120).images


def _refused(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    reason = dict(err.value.trailing_metadata() or ()).get("x-error-reason", "")
    return err.value.code(), reason, err.value.details()


def _usage(door, request_id_prefix: str, at_least: int = 1, timeout: float = 20.0) -> list[dict]:
    """The usage records whose request id starts with ``request_id_prefix``, once there are
    ``at_least`` (they are written by a thread of the gateway replica, soon after each call)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in door["redis"].xrange("ivm:usage")
        ]
        found = [r for r in found if r["request_id"].startswith(request_id_prefix)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_internal_services_are_listed_on_the_gateway_port(door):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = door["channel"]
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {
        s.name for r in refl.ServerReflectionInfo(iter([request])) for s in r.list_services_response.service
    }
    internal = {
        "internvl.preprocess.v1.PreprocessService",
        "internvl.encoder.v1.EncoderService",
        "internvl.decoder.v1.DecoderService",
    }
    assert internal | {"internvl.gateway.v1.GatewayService"} <= names
    health = health_pb2_grpc.HealthStub(channel)
    for name in internal:
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_embed_credential_gets_embeddings_billed_to_its_tenant(door):
    key = door["keys"]["alpha_embed"]
    before = door["redis"].xlen("ivm:usage")
    (ref,) = _embed(door, key, [png(448, 448, seed=1)])
    assert ref.kind == common_pb2.EMBEDDING_REF_KIND_CACHE and key_namespace(ref.key) == "alpha"
    assert (ref.tiles, ref.tokens_per_tile, ref.dim) == (1, 256, 64)
    (inline,) = _embed(door, key, [png(448, 448, seed=1)], inline=True)
    assert inline.kind == common_pb2.EMBEDDING_REF_KIND_INLINE and inline.key == ref.key
    assert tuple(inline.tensor.shape) == (256, 64) and len(inline.tensor.data) == 256 * 64 * 4
    # The same, with the key as x-api-key.
    stub = encoder_pb2_grpc.EncoderServiceStub(door["channel"])
    request = encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.ImageSource(data=png(448, 448, seed=1))])
    assert stub.EmbedImages(request, metadata=[("x-api-key", key)], timeout=60).embeddings[0].key == ref.key
    records = _usage(door, "embed-", at_least=3)
    assert len(records) == 3 and door["redis"].xlen("ivm:usage") == before + 3
    for r in records:
        assert (r["tenant"], r["model"], r["operation"], r["status"]) == ("alpha", MODEL, "embed", "ok")
        assert (r["images"], r["tiles"]) == ("1", "1")


def test_object_references_never_leave_the_gateway(door):
    """A three-tile embedding is over the shared cache's entry bound, so the encoder answers with a Ray
    object reference; the client gets the tensor itself."""
    (ref,) = _embed(door, door["keys"]["alpha_embed"], [png(896, 448, seed=2)])
    assert ref.kind == common_pb2.EMBEDDING_REF_KIND_INLINE
    assert ref.tiles == 3 and tuple(ref.tensor.shape) == (3 * 256, 64)
    assert len(ref.tensor.data) == 3 * 256 * 64 * 4


def test_a_forged_context_in_the_message_is_ignored(door):
    forged = common_pb2.RequestContext(
        request_id="forged",
        tenant="beta",
        cache_namespace="beta",
        priority=2**31 - 1,
        expires_unix_ms=int(time.time() * 1000) + 30_000,
        signature=b"\x00" * 32,
    )
    (ref,) = _embed(door, door["keys"]["alpha_embed"], [png(448, 448, seed=3)], context=forged)
    assert key_namespace(ref.key) == "alpha", "the namespace comes from the credential only"


def test_decode_resolves_own_references_only(door):
    keys = door["keys"]
    image = png(448, 448, seed=4)
    (own,) = _embed(door, keys["alpha_embed"], [image])
    events = _generate(door, keys["alpha_decode"], [own], max_tokens=3)
    assert events[-1].finish_reason == decoder_pb2.FINISH_REASON_LENGTH and not events[-1].error_message
    assert events[-1].usage.completion_tokens == 3 and events[-1].usage.image_tokens == 256
    assert events[0].request_id.startswith("decode-")
    (theirs,) = _embed(door, keys["beta_all"], [image])  # the same image, in beta's namespace
    assert key_namespace(theirs.key) == "beta" and theirs.key != own.key
    foreign = _refused(lambda: _generate(door, keys["alpha_decode"], [theirs]))
    missing = common_pb2.EmbeddingRef()
    missing.CopyFrom(own)
    missing.key = own.key[:-8] + "00000000"  # in alpha's namespace, but nothing there
    absent = _refused(lambda: _generate(door, keys["alpha_decode"], [missing]))
    assert foreign == absent, "another tenant's key and a missing one are refused alike"
    assert foreign[:2] == (grpc.StatusCode.UNAVAILABLE, "embedding_unresolvable")
    (record,) = [r for r in _usage(door, events[0].request_id)]
    assert (record["tenant"], record["operation"], record["completion_tokens"]) == ("alpha", "decode", "3")
    assert int(record["prompt_tokens"]) > 256 and record["image_tokens"] == "256"
    count = decoder_pb2_grpc.DecoderServiceStub(door["channel"]).CountTokens(
        decoder_pb2.CountTokensRequest(
            messages=[decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(image_index=0)])],
            image_tiles=[1],
        ),
        metadata=_auth(keys["alpha_decode"]),
        timeout=60,
    )
    assert count.image_tokens == 256 and count.total_tokens > 256


def test_tile_credential_tiles_but_cannot_decode(door):
    key = door["keys"]["alpha_tile"]
    (tiled,) = _tile(door, key, [png(896, 448, seed=5)])
    assert tuple(tiled.tiles.shape) == (3, 448, 448, 3) and (tiled.grid_cols, tiled.grid_rows) == (2, 1)
    (record,) = _usage(door, "tile-")
    assert (record["tenant"], record["operation"], record["tiles"]) == ("alpha", "tile", "3")
    code, reason, _ = _refused(lambda: _generate(door, key, []))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "scope_not_granted")
    code, reason, _ = _refused(lambda: _embed(door, key, [png(448, 448)]))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "scope_not_granted")


def test_no_credential_is_unauthenticated(door):
    for call in (
        lambda: _tile(door, None, [png(448, 448)]),
        lambda: _embed(door, None, [png(448, 448)]),
        lambda: _generate(door, None, []),
        lambda: _embed(door, "ivm-nobody-not-a-real-secret", [png(448, 448)]),
    ):
        assert _refused(call)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_chat_only_and_embed_only_keys_keep_to_their_scopes(door):
    keys = door["keys"]
    chat_key, embed_key = keys["alpha_chat"], keys["alpha_embed"]
    for call in (
        lambda: _embed(door, chat_key, [png(448, 448)]),
        lambda: _tile(door, chat_key, [png(448, 448)]),
        lambda: _generate(door, chat_key, []),
    ):
        assert _refused(call)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "scope_not_granted")
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(
        door["http"] + "/chat/completions",
        json=body,
        timeout=120,
        headers={"authorization": f"Bearer {embed_key}"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "scope_not_granted"
    assert r.json()["error"]["type"] == "permission_error"
    ok = httpx.post(
        door["http"] + "/chat/completions",
        json=body,
        timeout=120,
        headers={"authorization": f"Bearer {chat_key}"},
    )
    assert ok.status_code == 200, ok.text
    chat = gateway_pb2_grpc.GatewayServiceStub(door["channel"])
    request = gateway_pb2.ChatRequest(
        model=MODEL,
        max_tokens=2,
        messages=[gateway_pb2.ChatMessage(role="user", content=[gateway_pb2.Part(text="Hi")])],
    )
    code, reason, _ = _refused(lambda: list(chat.Chat(request, metadata=_auth(embed_key), timeout=60)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "scope_not_granted")
    assert list(chat.Chat(request, metadata=_auth(chat_key), timeout=120))[-1].usage.completion_tokens == 2


def test_model_choice_and_the_tenants_limits_apply(door):
    keys = door["keys"]
    code, reason, _ = _refused(
        lambda: _embed(door, keys["alpha_embed"], [png(448, 448)], **{"x-model": "other"})
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    assert _embed(door, keys["alpha_embed"], [png(448, 448)], **{"x-model": MODEL})[0].tiles == 1
    gamma = keys["gamma_tile"]
    code, reason, _ = _refused(lambda: _tile(door, gamma, [png(448, 448), png(448, 448, seed=1)]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "too_many_images")  # before any work
    assert len(_tile(door, gamma, [png(448, 448)])) == 1
    code, reason, _ = _refused(lambda: _tile(door, gamma, [png(448, 448)]))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")


def test_client_made_tiles_are_refused_with_a_reason(door):
    stub = encoder_pb2_grpc.EncoderServiceStub(door["channel"])
    tiles = common_pb2.Tensor(
        dtype=common_pb2.ELEMENT_TYPE_UINT8, shape=[1, 448, 448, 3], data=bytes(448 * 448 * 3)
    )
    request = encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.ImageSource(tiles=tiles)])
    code, reason, details = _refused(
        lambda: stub.EmbedImages(request, metadata=_auth(door["keys"]["alpha_embed"]), timeout=60)
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "tiles_not_accepted")
    assert "send image bytes" in details
