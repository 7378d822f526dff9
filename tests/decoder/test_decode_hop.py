"""The gateway → decoder hop carries the same events both ways: one ``DecodeRequest`` through the
in-process frontend (what a Ray handle calls, and what it pickles back) and through the decoder's real
gRPC server gives equal event sequences, field by field — the first event's prompt and image token
counts, token strings and bytes of every log-probability, the finish reason and the usage included."""

from __future__ import annotations

import pickle

import pytest
from internvl.decoder.v1 import decoder_pb2_grpc

from services.common.grpc_server import open_channel, start_server
from services.common.pb import context_to_pb, ref_to_pb
from services.common.refs import KIND_INLINE, EmbeddingRef
from services.common.tensors import WireTensor
from services.decoder.engine.async_engine import DecoderCore
from services.decoder.pb import decode_request_to_pb, event_from_pb
from services.decoder.server import DecoderFrontend, DecoderServicer
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    FinishReason,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
)
from services.embedding_cache.resolver import EmbeddingResolver
from tests.decoder.helpers import make_config
from tests.support.signing import SIGNER, signed


@pytest.fixture(scope="module")
async def decoder(tiny_ckpt):
    core = DecoderCore(make_config(tiny_ckpt, cache={"num_blocks": 128}))
    frontend = DecoderFrontend(core, EmbeddingResolver(None), SIGNER)
    server = await start_server([DecoderServicer(frontend).registration()])
    yield frontend, server.port
    await server.stop(0)
    core.shutdown()


def inline_ref(reference, seed: int) -> EmbeddingRef:
    emb = reference.embedding(seed)  # (256, D) float32
    return EmbeddingRef(
        kind=KIND_INLINE,
        key=f"hop-image-{seed}",
        image_sha256=f"{seed:064x}",
        tiles=1,
        tokens_per_tile=emb.shape[0],
        dim=emb.shape[1],
        dtype="float32",
        tensor=WireTensor.from_torch(emb),
    )


REQUESTS = {
    "greedy-logprobs": DecodeRequest(
        messages=[
            ChatMessage("system", [TextContent("Answer briefly.")]),
            ChatMessage("user", [ImagePlaceholder(), TextContent("What is in the picture?")]),
        ],
        sampling=SamplingParams(temperature=0.0, logprobs=3, ignore_eos=True),
        max_tokens=8,
    ),
    "seeded-sampling": DecodeRequest(
        messages=[
            ChatMessage("user", [TextContent("Tell me "), TextContent("a story."), ImagePlaceholder()])
        ],
        sampling=SamplingParams(
            temperature=0.75,
            top_p=0.5,
            top_k=20,
            seed=7,
            repetition_penalty=1.25,
            logprobs=0,
            ignore_eos=True,
        ),
        max_tokens=6,
    ),
}


@pytest.mark.parametrize("name", list(REQUESTS))
async def test_the_grpc_stream_equals_the_handle_stream(decoder, reference, name):
    frontend, port = decoder
    request, refs = REQUESTS[name], [inline_ref(reference, 3)]
    # Separate prefix-cache namespaces, so neither run is served from the other's KV blocks.
    local_ctx = signed(request_id=f"hop-{name}", cache_namespace=f"local-{name}")
    grpc_ctx = signed(request_id=f"hop-{name}", cache_namespace=f"grpc-{name}")

    local = [pickle.loads(pickle.dumps(e)) async for e in frontend.generate(request, refs, local_ctx)]

    pb = decode_request_to_pb(request)
    pb.images.extend(ref_to_pb(r) for r in refs)
    pb.context.CopyFrom(context_to_pb(grpc_ctx))
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stream = decoder_pb2_grpc.DecoderServiceStub(channel).Generate(pb, timeout=120)
        remote = [event_from_pb(r) async for r in stream]

    assert len(remote) == len(local) == request.max_tokens
    first, last = local[0], local[-1]
    assert first.prompt_tokens is not None and first.prompt_tokens > 256 and first.image_tokens == 256
    assert last.finish_reason is FinishReason.LENGTH and last.usage.image_tokens == 256
    lps = [lp for e in local for lp in e.logprobs]
    assert lps and all(lp.token and lp.token_bytes == lp.token.encode() for lp in lps)
    assert all(len(lp.top) == request.sampling.logprobs for lp in lps)
    for k, (want, got) in enumerate(zip(local, remote, strict=True)):
        assert got == want, f"event {k}"


async def test_a_structured_request_crosses_the_hop(decoder, reference):
    """``response_format`` and ``logit_bias`` reach the engine over gRPC as over the handle: the same
    events, a document of the schema."""
    import json

    import jsonschema

    from services.decoder.engine.response_format import ResponseFormat

    frontend, port = decoder
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["cat", "dog"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["label", "count"],
        "additionalProperties": False,
    }
    sampling = SamplingParams(
        temperature=0.9, seed=3, response_format=ResponseFormat.json_schema(schema), logit_bias={100: -100.0}
    )
    request = DecodeRequest(
        [ChatMessage("user", [ImagePlaceholder(), TextContent("JSON, please.")])], sampling, 64
    )
    refs = [inline_ref(reference, 3)]
    local_ctx = signed(request_id="hop-structured", cache_namespace="local-structured")
    local = [e async for e in frontend.generate(request, refs, local_ctx)]
    pb = decode_request_to_pb(request)
    pb.images.extend(ref_to_pb(r) for r in refs)
    pb.context.CopyFrom(context_to_pb(signed(request_id="hop-structured", cache_namespace="grpc-structured")))
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stream = decoder_pb2_grpc.DecoderServiceStub(channel).Generate(pb, timeout=120)
        remote = [event_from_pb(r) async for r in stream]
    assert remote == local and local[-1].finish_reason is FinishReason.STOP
    jsonschema.validate(json.loads("".join(e.text for e in local)), schema)


async def test_the_choices_of_n_cross_the_hop(decoder, reference):
    """``n`` reaches the engine over gRPC and each event comes back with its choice's index: per choice,
    the same events as over the handle (the interleaving of the choices is the engine's timing)."""
    request = DecodeRequest(
        [ChatMessage("user", [ImagePlaceholder(), TextContent("Three takes, please.")])],
        SamplingParams(temperature=0.8, seed=21, ignore_eos=True, logprobs=1),
        5,
        n=3,
    )
    frontend, port = decoder
    refs = [inline_ref(reference, 3)]
    local_ctx = signed(request_id="hop-n", cache_namespace="local-n")
    local = [e async for e in frontend.generate(request, refs, local_ctx)]
    pb = decode_request_to_pb(request)
    pb.images.extend(ref_to_pb(r) for r in refs)
    pb.context.CopyFrom(context_to_pb(signed(request_id="hop-n", cache_namespace="grpc-n")))
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stream = decoder_pb2_grpc.DecoderServiceStub(channel).Generate(pb, timeout=120)
        remote = [event_from_pb(r) async for r in stream]

    def choices(events):
        return {k: [e for e in events if e.index == k] for k in sorted({e.index for e in events})}

    assert sorted(choices(local)) == [0, 1, 2]
    for k, (want, got) in enumerate(zip(choices(local).values(), choices(remote).values(), strict=True)):
        assert [e.token_ids for e in got] == [e.token_ids for e in want], k
        assert [e.logprobs for e in got] == [e.logprobs for e in want], k
        assert got[-1].finish_reason is FinishReason.LENGTH and got[-1].usage.completion_tokens == 5
