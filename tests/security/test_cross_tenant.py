"""An internal caller with a valid context of its own tries to reach another tenant's data through the
decoder's gRPC service: another namespace's cache entry, a poisoned prefix cache, a prompt of millions
of tokens. Real encoder and decoder cores of the tiny checkpoint, a real gRPC server and channel, an
embedding store holding what the encoder made."""

from __future__ import annotations

import io

import grpc
import pytest
import torch
from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from PIL import Image

from services.common.grpc_server import open_channel, start_server
from services.common.pb import context_to_pb, ref_to_pb
from services.common.refs import KIND_CACHE, KIND_INLINE, EmbeddingRef
from services.common.tensors import WireTensor
from services.common.types import TilingParams
from services.decoder.pb import decode_request_to_pb
from services.decoder.server import DecoderFrontend, DecoderServicer
from services.decoder.types import ChatMessage, DecodeRequest, ImagePlaceholder, SamplingParams, TextContent
from services.embedding_cache.memory import MemoryEmbeddingStore
from services.embedding_cache.resolver import EmbeddingResolver
from services.embedding_cache.store import StoredEmbedding
from services.encoder.core import ImageInput
from tests.support.signing import SIGNER, signed

VICTIM, ATTACKER = "victim-ns", "attacker-ns"
REQUEST = DecodeRequest(
    messages=[ChatMessage("user", [ImagePlaceholder(), TextContent("Describe the picture.")])],
    sampling=SamplingParams(temperature=0.0, ignore_eos=True),
    max_tokens=8,
)


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(448, 448, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


async def _victims_embedding(checkpoint) -> EmbeddingRef:
    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore, PreprocessorTileSource
    from services.preprocess.pipeline import Preprocessor

    with Preprocessor() as pre:
        encoder = EncoderCore.from_config(
            EncoderConfig(checkpoint=str(checkpoint), device="cpu", dtype="float32", fallback="inline"),
            tile_source=PreprocessorTileSource(pre),
        )
        try:
            (ref,) = await encoder.embed_images([ImageInput(_png(1), TilingParams())], VICTIM, inline=True)
        finally:
            await encoder.close()
    return ref


@pytest.fixture(scope="module")
async def mesh(cores, tiny_checkpoint):
    """The victim's image embedded by the real encoder and stored under the victim's key; a decoder
    gRPC server reading that store."""
    store = MemoryEmbeddingStore()
    ref = await _victims_embedding(tiny_checkpoint)
    await store.put(ref.key, StoredEmbedding.from_tensor(ref.tensor, tiles=ref.tiles))
    frontend = DecoderFrontend(cores["decoder"], EmbeddingResolver(store), SIGNER)
    server = await start_server([DecoderServicer(frontend).registration()])
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        yield {"ref": ref, "stub": decoder_pb2_grpc.DecoderServiceStub(channel)}
    await server.stop(0)


def _cache_ref(ref: EmbeddingRef, key: str) -> EmbeddingRef:
    return ref.with_kind(KIND_CACHE, key=key, tensor=None)


async def _generate(stub, refs, namespace: str) -> list[int]:
    pb = decode_request_to_pb(REQUEST)
    pb.images.extend(ref_to_pb(r) for r in refs)
    pb.context.CopyFrom(context_to_pb(signed(tenant=namespace, cache_namespace=namespace)))
    return [t async for r in stub.Generate(pb, timeout=120) for t in r.token_ids]


async def _refusal(stub, refs, namespace: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stub, refs, namespace)
    return err.value


async def test_another_namespaces_key_is_refused_exactly_like_a_key_that_does_not_exist(mesh):
    stub, ref = mesh["stub"], mesh["ref"]
    assert await _generate(stub, [_cache_ref(ref, ref.key)], VICTIM)  # the owner reads it
    stolen = await _refusal(stub, [_cache_ref(ref, ref.key)], ATTACKER)
    missing = await _refusal(stub, [_cache_ref(ref, ref.key.replace(VICTIM, ATTACKER))], ATTACKER)
    not_an_embedding = await _refusal(stub, [_cache_ref(ref, "ivm:lim:tenants")], ATTACKER)
    answers = {
        (e.code(), e.details(), dict(e.trailing_metadata())["x-error-reason"])
        for e in (stolen, missing, not_an_embedding)
    }
    assert answers == {(grpc.StatusCode.UNAVAILABLE, stolen.details(), "embedding_unresolvable")}


async def test_an_inline_tensor_cannot_be_filed_under_another_images_key(mesh):
    """The attacker sends garbage inline, claiming the victim's image key, in the namespace it shares
    with the victim; the victim's next request for the real image must not run on the garbage's KV
    blocks: its tokens equal a run on the real embedding that no prefix cache could have served."""
    stub, ref = mesh["stub"], mesh["ref"]
    shared = "shared-ns"
    key = ref.key.replace(VICTIM, shared)
    garbage = WireTensor.from_torch(torch.zeros(ref.shape, dtype=torch.float32))
    poison = EmbeddingRef(
        KIND_INLINE, key, ref.image_sha256, ref.tiles, ref.tokens_per_tile, ref.dim, ref.dtype, tensor=garbage
    )
    poisoned_tokens = await _generate(stub, [poison], shared)
    honest = ref.with_kind(KIND_INLINE, key=key)
    control = await _generate(stub, [ref.with_kind(KIND_INLINE, key="")], "control-ns")
    victim = await _generate(stub, [honest], shared)
    assert poisoned_tokens != control, "the garbage must change the answer, or the test shows nothing"
    assert victim == control


async def test_count_tokens_refuses_a_blown_up_image_list(mesh):
    stub = mesh["stub"]
    ctx = context_to_pb(signed(tenant=ATTACKER, cache_namespace=ATTACKER))
    message = decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(image_index=0)])
    for tiles, reason in (
        ([200], "too_many_tiles"),
        ([41] * 4, "too_many_tiles"),
        ([1] * 17, "too_many_images"),
    ):
        parts = [decoder_pb2.ContentPart(image_index=k) for k in range(len(tiles))]
        request = decoder_pb2.CountTokensRequest(
            messages=[decoder_pb2.Message(role="user", content=parts)], image_tiles=tiles, context=ctx
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CountTokens(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata())["x-error-reason"] == reason
    ok = await stub.CountTokens(
        decoder_pb2.CountTokensRequest(messages=[message], image_tiles=[3], context=ctx), timeout=30
    )
    assert ok.image_tokens == 3 * 256
