"""Nothing behind the gateway trusts the wire: every entry point of every internal service, over Ray
handles and over Serve's gRPC proxy, refuses a request context that the gateway did not sign (none at
all, another secret's, one altered after signing, an expired one, a priority out of range) with
UNAUTHENTICATED, and answers the same request with a context the gateway signed. A real mesh on the
session's Ray Serve, from the rendered Serve config."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest
from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.context import ContextSigner, RequestContext
from services.common.errors import Unauthenticated
from services.common.grpc_server import open_channel
from services.common.pb import context_to_pb
from services.common.types import TilingParams
from services.decoder.pb import messages_to_pb
from services.decoder.types import ChatMessage, DecodeRequest, SamplingParams, TextContent
from tests.support.images import png
from tests.support.mesh import deployed, one_model_mesh_config
from tests.support.signing import SIGNER, signed

pytestmark = pytest.mark.ray

MODEL = "tiny-forged"
IMAGE = png(448, 448, seed=3)
VICTIM = RequestContext(request_id="forged", tenant="victim", cache_namespace="victim", priority=10)


def _forgeries() -> dict[str, tuple[RequestContext, str]]:
    other = ContextSigner(b"another-secret-of-the-right-length-0123456789")
    tampered = replace(signed(replace(VICTIM, tenant="attacker", cache_namespace="attacker")),
                       tenant="victim", cache_namespace="victim")  # fmt: skip
    return {
        "unsigned": (replace(VICTIM, priority=2**31 - 1), "context_unsigned"),
        "another secret": (other.sign(VICTIM), "context_invalid"),
        "altered after signing": (tampered, "context_invalid"),
        "expired": (SIGNER.sign(VICTIM, now=time.time() - 600), "context_expired"),
        "priority out of range": (SIGNER.sign(replace(VICTIM, priority=11)), "context_invalid"),
        "weight raised after signing": (replace(signed(VICTIM), weight=100.0), "context_invalid"),
        "kv cap lifted after signing": (
            replace(signed(replace(VICTIM, max_kv_share=0.1)), max_kv_share=None),
            "context_invalid",
        ),
        "weight out of range": (SIGNER.sign(replace(VICTIM, weight=1000.0)), "context_invalid"),
    }


MESSAGES = [ChatMessage("user", [TextContent("hello")])]


@pytest.fixture(scope="module")
def mesh(ray_serve, tiny_checkpoint):
    from ray import serve

    # Serve's gRPC proxy reaches the internal apps only where an operator turns it on (their routes).
    gateway = {"serve_grpc_port": ray_serve["grpc_port"]}
    cfg = one_model_mesh_config(ray_serve["http_port"], tiny_checkpoint, MODEL, gateway=gateway)
    with deployed(cfg):
        yield {
            "preprocess": serve.get_app_handle("preprocess"),
            "encoder": serve.get_app_handle(f"encoder-{MODEL}"),
            "decoder": serve.get_app_handle(f"decoder-{MODEL}"),
            "grpc": f"127.0.0.1:{ray_serve['grpc_port']}",
        }


async def _tile(m, ctx):
    return await m["preprocess"].tile.remote([(IMAGE, TilingParams(max_num=1))], ctx)


async def _embed(m, ctx):
    return await m["encoder"].embed.remote([(IMAGE, TilingParams(max_num=1))], ctx, True)


async def _generate(m, ctx):
    request = DecodeRequest(MESSAGES, SamplingParams(temperature=0.0), max_tokens=2)
    return [e async for e in m["decoder"].options(stream=True).generate.remote(request, [], ctx)]


async def _count(m, ctx):
    return await m["decoder"].count_tokens.remote(MESSAGES, [], ctx)


HANDLE_CALLS = {"preprocess.tile": _tile, "encoder.embed": _embed, "decoder.generate": _generate,
                "decoder.count_tokens": _count}  # fmt: skip


@pytest.mark.parametrize("entry", list(HANDLE_CALLS))
async def test_handles_refuse_every_forged_context(mesh, entry):
    call = HANDLE_CALLS[entry]
    assert await call(mesh, signed(replace(VICTIM, priority=0)))  # the gateway's context is served
    for name, (ctx, reason) in _forgeries().items():  # made now: a signed one must not expire first
        with pytest.raises(Unauthenticated) as err:
            await call(mesh, ctx)
        # Ray raises a subclass of both RayTaskError and the replica's error, whose class attributes
        # shadow the instance's: the replica's own error is its ``cause``.
        assert err.value.cause.reason == reason, name


def _grpc_requests(ctx: RequestContext) -> dict[str, tuple]:
    pb_ctx = context_to_pb(ctx)
    image = preprocess_pb2.ImageInput(data=IMAGE)
    gen = decoder_pb2.GenerateRequest(
        context=pb_ctx, messages=messages_to_pb(MESSAGES), sampling=decoder_pb2.SamplingParams(max_tokens=2)
    )
    return {
        "TileImages": ("preprocess", preprocess_pb2_grpc.PreprocessServiceStub, "TileImages",
                       preprocess_pb2.TileImagesRequest(context=pb_ctx, images=[image])),
        "EmbedImages": (f"encoder-{MODEL}", encoder_pb2_grpc.EncoderServiceStub, "EmbedImages",
                        encoder_pb2.EmbedImagesRequest(context=pb_ctx, images=[encoder_pb2.ImageSource(data=IMAGE)])),
        "Generate": (f"decoder-{MODEL}", decoder_pb2_grpc.DecoderServiceStub, "Generate", gen),
        "CountTokens": (f"decoder-{MODEL}", decoder_pb2_grpc.DecoderServiceStub, "CountTokens",
                        decoder_pb2.CountTokensRequest(context=pb_ctx, messages=messages_to_pb(MESSAGES))),
    }  # fmt: skip


async def _call_grpc(channel, app, stub_cls, method, request):
    call = getattr(stub_cls(channel), method)(request, metadata=(("application", app),), timeout=120)
    if method == "Generate":
        return [r async for r in call]
    return await call


@pytest.mark.parametrize("method", ["TileImages", "EmbedImages", "Generate", "CountTokens"])
async def test_serves_grpc_proxy_reaches_servicers_that_refuse_every_forged_context(mesh, method):
    """Serve's own gRPC proxy is off by default; where an operator turns it on, it is unauthenticated,
    and the servicers behind it still believe nothing they are not signed."""
    async with open_channel(mesh["grpc"]) as channel:
        assert await _call_grpc(channel, *_grpc_requests(signed(replace(VICTIM, priority=0)))[method])
        for name, (ctx, _) in _forgeries().items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call_grpc(channel, *_grpc_requests(ctx)[method])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            # Serve's proxy passes the code and message on (not the reason metadata), no traceback.
            assert "ray::" not in err.value.details() and "context" in err.value.details(), name
