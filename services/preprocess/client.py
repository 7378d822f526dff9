"""Clients of the preprocess service: one interface, two transports.

``HandlePreprocessClient`` calls the Ray Serve deployment through a DeploymentHandle (inside the
cluster: numpy tiles travel through Ray's object store, no protobuf copy). ``GrpcPreprocessClient``
calls a standalone gRPC server (development, and callers outside Ray). Both return the same domain
objects, so the encoder does not care which one it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.grpc_server import open_channel
from services.common.pb import RequestContext, context_to_pb, tensor_from_pb, tiling_to_pb
from services.common.types import TilingParams
from services.preprocess.tiling import TiledImage


class PreprocessClient(Protocol):
    async def tile(
        self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext
    ) -> list[TiledImage]: ...


class LocalPreprocessClient:
    """In-process: calls a ``Preprocessor`` directly (standalone servers, tests, benchmarks)."""

    def __init__(self, preprocessor: Any):
        self.preprocessor = preprocessor

    async def tile(self, items, ctx):
        return await self.preprocessor.atile_images(list(items))


class HandlePreprocessClient:
    def __init__(self, handle: Any):
        self.handle = handle

    async def tile(self, items, ctx):
        return await self.handle.tile.remote(list(items), ctx)


class GrpcPreprocessClient:
    def __init__(self, target: str, max_message_bytes: int | None = None):
        self.channel = (
            open_channel(target) if max_message_bytes is None else open_channel(target, max_message_bytes)
        )
        self.stub = preprocess_pb2_grpc.PreprocessServiceStub(self.channel)

    async def tile(self, items, ctx):
        request = preprocess_pb2.TileImagesRequest(
            context=context_to_pb(ctx),
            images=[preprocess_pb2.ImageInput(data=data, tiling=tiling_to_pb(p)) for data, p in items],
        )
        timeout = ctx.remaining()
        reply = await self.stub.TileImages(request, timeout=None if timeout is None else max(timeout, 0.001))
        return [tiled_from_pb(img) for img in reply.images]

    async def close(self) -> None:
        await self.channel.close()


def tiled_from_pb(pb: preprocess_pb2.TiledImage) -> TiledImage:
    return TiledImage(
        tiles=tensor_from_pb(pb.tiles).to_numpy(),
        grid=(pb.grid_cols, pb.grid_rows),
        width=pb.width,
        height=pb.height,
        sha256=pb.image_sha256 or None,
    )
