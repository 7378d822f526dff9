"""The encoder servicer: protobuf in, one call to ``EncoderCore``, protobuf out.

The request context is verified first (the gateway's signature, ``services.common.context``); the
namespace, priority, tenant and fair-share weight come from it only.
"""

from __future__ import annotations

import time

from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.context import ContextSigner
from services.common.errors import InvalidArgument
from services.common.pb import context_from_pb, ref_to_pb, tensor_from_pb, tiling_from_pb
from services.common.refs import KIND_INLINE, KIND_OBJECT
from services.common.types import TiledImage
from services.embedding_cache.resolver import EmbeddingResolver
from services.encoder.core import EncoderCore, ImageInput

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, core: EncoderCore, signer: ContextSigner, default_max_num: int = 12):
        self.core = core
        self.signer = signer
        self.default_max_num = default_max_num
        self.resolver = EmbeddingResolver(core.store)

    async def EmbedImages(self, request, context):  # noqa: N802 - gRPC method name
        ctx = self.signer.verify(context_from_pb(request.context))
        remaining = ctx.remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        by_bytes, by_tiles = [], []
        for i, image in enumerate(request.images):
            tiling = tiling_from_pb(image.tiling, self.default_max_num)
            which = image.WhichOneof("source")
            if which == "data":
                by_bytes.append((i, ImageInput(image.data, tiling)))
            elif which == "tiles":
                tiles = tensor_from_pb(image.tiles).to_numpy()
                grid = (image.grid_cols or 1, image.grid_rows or 1)
                # The cache address of client-made tiles is the hash of the tiles themselves: a claimed
                # image hash is not trusted (it could plant embeddings under another image's key).
                by_tiles.append((i, TiledImage(tiles, grid, 0, 0, None), tiling))
            else:
                raise InvalidArgument(f"image {i} has neither bytes nor tiles")
        refs = [None] * len(request.images)
        common = dict(
            namespace=ctx.cache_namespace,
            priority=ctx.priority,
            deadline=deadline,
            tenant=ctx.tenant,
            weight=ctx.weight,
        )
        if by_bytes:
            for (i, _), ref in zip(
                by_bytes, await self.core.embed_images([b for _, b in by_bytes], **common, ctx=ctx)
            ):
                refs[i] = ref
        if by_tiles:
            got = await self.core.embed_tiles(
                [t for _, t, _ in by_tiles], tiling=[p for *_, p in by_tiles], **common
            )
            for (i, *_), ref in zip(by_tiles, got):
                refs[i] = ref
        # A Ray object reference (the fallback while the shared cache is down) cannot travel over gRPC:
        # the caller gets the tensor itself.
        refs = [
            await self._inline(r, ctx.cache_namespace)
            if request.return_inline or r.kind == KIND_OBJECT
            else r
            for r in refs
        ]
        return encoder_pb2.EmbedImagesResponse(embeddings=[ref_to_pb(r) for r in refs])

    async def _inline(self, ref, ref_namespace: str):
        if ref.kind == KIND_INLINE:
            return ref
        tensor = await self.resolver.resolve(ref, ref_namespace)
        return ref.with_kind(KIND_INLINE, tensor=tensor, object_ref=None)

    def registration(self):
        return (encoder_pb2_grpc.add_EncoderServiceServicer_to_server, self, SERVICE_NAME)
