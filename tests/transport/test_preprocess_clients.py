"""The preprocess client interface over both transports gives what the in-process pipeline gives:
a Serve DeploymentHandle (numpy through Ray's object store) and real gRPC (standalone server, and
Serve's gRPC proxy routed by the `application` metadata)."""

import io

import numpy as np
import pytest
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.grpc_server import open_channel, start_server
from services.common.pb import RequestContext
from services.common.types import TilingParams
from services.preprocess.client import GrpcPreprocessClient, HandlePreprocessClient, LocalPreprocessClient
from services.preprocess.pipeline import Preprocessor
from services.preprocess.server import PreprocessServicer

pytestmark = pytest.mark.ray


def _jpeg(w, h, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


ITEMS = [(_jpeg(1280, 720, 1), TilingParams(max_num=6)), (_jpeg(300, 900, 2), TilingParams())]


@pytest.fixture(scope="module")
def expected():
    with Preprocessor() as pre:
        return pre.tile_images(ITEMS)


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.grid == w.grid and g.sha256 == w.sha256
        assert np.array_equal(g.tiles, w.tiles)


async def test_local_and_grpc_clients_agree(expected):
    pre = Preprocessor()
    server = await start_server([PreprocessServicer(pre).registration()])
    client = GrpcPreprocessClient(f"127.0.0.1:{server.port}")
    try:
        _same(await LocalPreprocessClient(pre).tile(ITEMS, RequestContext()), expected)
        _same(await client.tile(ITEMS, RequestContext()), expected)
    finally:
        await client.close()
        await server.stop(0)
        pre.close()


@pytest.fixture(scope="module")
def preprocess_app(ray_serve):
    from ray import serve

    from services.preprocess.deployment import build_app

    handle = serve.run(
        build_app({"deployment_options": {"autoscaling_config": None, "num_replicas": 1}}),
        name="preprocess",
        route_prefix="/preprocess",
    )
    yield handle
    serve.delete("preprocess")


async def test_serve_handle_client(preprocess_app, expected):
    client = HandlePreprocessClient(preprocess_app)
    _same(await client.tile(ITEMS, RequestContext(request_id="r1")), expected)
    with pytest.raises(InvalidArgument):
        await client.tile([(b"garbage", TilingParams())], RequestContext())


async def test_serve_grpc_proxy_routes_by_application(preprocess_app, ray_serve, expected):
    request = preprocess_pb2.TileImagesRequest(
        images=[preprocess_pb2.ImageInput(data=d, tiling={"max_num": p.max_num}) for d, p in ITEMS]
    )
    async with open_channel(f"127.0.0.1:{ray_serve['grpc_port']}") as channel:
        stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        reply = await stub.TileImages(request, metadata=(("application", "preprocess"),))
    from services.preprocess.client import tiled_from_pb

    _same([tiled_from_pb(i) for i in reply.images], expected)
