"""The preprocess service over each transport gives what the in-process pipeline gives: real gRPC
(standalone server, and Serve's gRPC proxy routed by the `application` metadata) and a Serve
DeploymentHandle (numpy through Ray's object store, as the encoder's ``HandleTileSource`` calls it)."""

import numpy as np
import pytest
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.grpc_server import open_channel, start_server
from services.common.pb import context_to_pb, tensor_from_pb, tiling_to_pb
from services.common.types import TilingParams
from services.preprocess.pipeline import Preprocessor
from services.preprocess.server import PreprocessServicer
from tests.support.images import jpeg
from tests.support.signing import SIGNER, signed

pytestmark = pytest.mark.ray


ITEMS = [
    (jpeg(1280, 720, 1, block=1), TilingParams(max_num=6)),
    (jpeg(300, 900, 2, block=1), TilingParams()),
]


def request() -> preprocess_pb2.TileImagesRequest:
    return preprocess_pb2.TileImagesRequest(
        context=context_to_pb(signed()),
        images=[preprocess_pb2.ImageInput(data=data, tiling=tiling_to_pb(p)) for data, p in ITEMS],
    )


@pytest.fixture(scope="module")
def expected():
    with Preprocessor() as pre:
        return pre.tile_images(ITEMS)


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.grid == w.grid and g.sha256 == w.sha256
        assert np.array_equal(g.tiles, w.tiles)


def _same_pb(reply: preprocess_pb2.TileImagesResponse, want):
    assert len(reply.images) == len(want)
    for g, w in zip(reply.images, want):
        assert (g.grid_cols, g.grid_rows) == w.grid and g.image_sha256 == w.sha256
        assert (g.width, g.height) == (w.width, w.height)
        assert np.array_equal(tensor_from_pb(g.tiles).to_numpy(), w.tiles)


async def test_grpc_server_gives_the_pipelines_tiles(expected):
    pre = Preprocessor()
    server = await start_server([PreprocessServicer(pre, SIGNER).registration()])
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            reply = await preprocess_pb2_grpc.PreprocessServiceStub(channel).TileImages(request())
        _same_pb(reply, expected)
    finally:
        await server.stop(0)
        pre.close()


@pytest.fixture(scope="module")
def preprocess_app(ray_serve):
    from ray import serve

    from services.preprocess.deployment import build_app

    handle = serve.run(
        build_app({"deployment_options": {"autoscaling_config": None, "num_replicas": 1}}),
        name="preprocess",
        route_prefix="/preprocess",  # Serve's gRPC proxy finds an application only if it has a route
    )
    yield handle
    serve.delete("preprocess")


async def test_serve_handle_tile(preprocess_app, expected):
    _same(await preprocess_app.tile.remote(list(ITEMS), signed(request_id="r1")), expected)
    with pytest.raises(InvalidArgument):
        await preprocess_app.tile.remote([(b"garbage", TilingParams())], signed())


async def test_serve_grpc_proxy_routes_by_application(preprocess_app, ray_serve, expected):
    async with open_channel(f"127.0.0.1:{ray_serve['grpc_port']}") as channel:
        stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        reply = await stub.TileImages(request(), metadata=(("application", "preprocess"),))
    _same_pb(reply, expected)
