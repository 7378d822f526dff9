"""The preprocess servicer: protobuf in, one call to the ``Preprocessor``, protobuf out.

The request context is verified first (the gateway's signature, ``services.common.context``).
"""

from __future__ import annotations

from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.context import ContextSigner
from services.common.pb import context_from_pb, tensor_to_pb, tiling_from_pb
from services.common.tensors import WireTensor
from services.common.types import TiledImage
from services.preprocess.pipeline import Preprocessor

SERVICE_NAME = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name


def tiled_to_pb(image: TiledImage) -> preprocess_pb2.TiledImage:
    return preprocess_pb2.TiledImage(
        tiles=tensor_to_pb(WireTensor.from_numpy(image.tiles)),
        grid_cols=image.grid[0],
        grid_rows=image.grid[1],
        width=image.width,
        height=image.height,
        image_sha256=image.sha256 or "",
        num_image_tokens=image.num_image_tokens(),
    )


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, preprocessor: Preprocessor, signer: ContextSigner, default_max_num: int = 12):
        self.preprocessor = preprocessor
        self.signer = signer
        self.default_max_num = default_max_num

    async def TileImages(self, request, context):  # noqa: N802 - gRPC method name
        self.signer.verify(context_from_pb(request.context))
        items = [(img.data, tiling_from_pb(img.tiling, self.default_max_num)) for img in request.images]
        tiled = await self.preprocessor.atile_images(items)
        return preprocess_pb2.TileImagesResponse(images=[tiled_to_pb(t) for t in tiled])

    def registration(self):
        return (preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server, self, SERVICE_NAME)
