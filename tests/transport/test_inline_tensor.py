"""A 24 MB inline tensor over a real gRPC channel: 41 uint8 tiles sent to the encoder service, which
answers with the embeddings inline; they equal transformers' own image features."""

import numpy as np
import pytest
import torch
from internvl.common.v1 import common_pb2
from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.grpc_server import open_channel, start_server
from services.common.pb import context_to_pb, ref_from_pb, tensor_to_pb
from services.common.tensors import WireTensor
from services.encoder.config import EncoderConfig
from services.encoder.core import EncoderCore
from services.encoder.server import EncoderServicer
from services.preprocess.normalize import normalize_tiles
from tests.support.signing import SIGNER, signed


@pytest.fixture(scope="module")
async def encoder_server(tiny_checkpoint):
    core = EncoderCore.from_config(
        EncoderConfig(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32")
    )
    server = await start_server([EncoderServicer(core, SIGNER).registration()])
    yield server
    await server.stop(0)
    await core.close()


async def test_41_tiles_inline_request_and_inline_embeddings(encoder_server, tiny_checkpoint):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(41, 448, 448, 3), dtype=np.uint8)
    request = encoder_pb2.EmbedImagesRequest(
        context=context_to_pb(signed(cache_namespace="transport-test")),
        images=[
            encoder_pb2.ImageSource(
                tiles=tensor_to_pb(WireTensor.from_numpy(tiles)),
                tiling=common_pb2.TilingParams(max_num=40),
                grid_cols=8,
                grid_rows=5,
            )
        ],
        return_inline=True,
    )
    assert request.ByteSize() > 24_000_000
    async with open_channel(f"127.0.0.1:{encoder_server.port}") as channel:
        reply = await encoder_pb2_grpc.EncoderServiceStub(channel).EmbedImages(request, timeout=120)
    (ref,) = [ref_from_pb(r) for r in reply.embeddings]
    assert ref.kind == "inline" and ref.tiles == 41 and ref.shape == (41 * 256, ref.dim)
    got = ref.tensor.to_torch()

    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        want = model.model.get_image_features(
            pixel_values=normalize_tiles(torch.from_numpy(tiles))
        ).pooler_output.reshape(-1, ref.dim)
    assert (got - want).abs().max().item() <= 1e-5
