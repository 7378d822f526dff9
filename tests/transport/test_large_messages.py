"""Large payloads over real gRPC channels: a 41-tile image (24.7 MB of uint8 tiles) comes back whole
under the mesh's explicit bounds, and the same call under gRPC's 4 MiB default is refused."""

import io

import grpc
import numpy as np
import pytest
from internvl.common.v1 import common_pb2
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from PIL import Image

from services.common.grpc_server import open_channel, start_server
from services.common.pb import context_to_pb, tensor_from_pb
from services.preprocess.pipeline import Preprocessor
from services.preprocess.server import PreprocessServicer
from tests.support.images import png
from tests.support.signing import SIGNER, signed


def _png(width: int, height: int) -> bytes:
    return png(width, height, block=8, resample="nearest")


@pytest.fixture(scope="module")
async def preprocess_server():
    pre = Preprocessor()
    server = await start_server([PreprocessServicer(pre, SIGNER).registration()])
    yield server
    await server.stop(0)
    pre.close()


async def test_41_tile_image_over_grpc(preprocess_server):
    data = _png(8 * 448, 5 * 448)  # aspect 1.6 -> an 8x5 grid at max_num 40, plus the thumbnail
    request = preprocess_pb2.TileImagesRequest(
        context=context_to_pb(signed()),
        images=[preprocess_pb2.ImageInput(data=data, tiling=common_pb2.TilingParams(max_num=40))],
    )
    async with open_channel(f"127.0.0.1:{preprocess_server.port}") as channel:
        reply = await preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(request)
    (image,) = reply.images
    tiles = tensor_from_pb(image.tiles).to_numpy()
    assert (image.grid_cols, image.grid_rows) == (8, 5)
    assert tiles.shape == (41, 448, 448, 3) and tiles.dtype == np.uint8
    assert reply.ByteSize() > 24_000_000
    assert image.num_image_tokens == 41 * 256
    # Spot-check content: tile 0 is the top-left 448x448 of the (already 3584x2240) image.
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(tiles[0], original[:448, :448])


async def test_default_grpc_limit_would_refuse_it(preprocess_server):
    data = _png(8 * 448, 5 * 448)
    request = preprocess_pb2.TileImagesRequest(
        context=context_to_pb(signed()),
        images=[preprocess_pb2.ImageInput(data=data, tiling=common_pb2.TilingParams(max_num=40))],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{preprocess_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_bad_image_is_invalid_argument_with_reason(preprocess_server):
    request = preprocess_pb2.TileImagesRequest(
        context=context_to_pb(signed()), images=[preprocess_pb2.ImageInput(data=b"not an image")]
    )
    async with open_channel(f"127.0.0.1:{preprocess_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(request)
        # The server keeps serving after bad input.
        ok = await preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(
            preprocess_pb2.TileImagesRequest(
                context=context_to_pb(signed()), images=[preprocess_pb2.ImageInput(data=_png(64, 64))]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["x-error-reason"]
    assert len(ok.images) == 1


async def test_health_and_reflection_without_ray_metadata(preprocess_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with open_channel(f"127.0.0.1:{preprocess_server.port}") as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="internvl.preprocess.v1.PreprocessService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "internvl.preprocess.v1.PreprocessService" in names
