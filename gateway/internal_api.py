"""The internal services' gRPC APIs on the gateway's own server: the same protos, one door.

``internvl.preprocess.v1.PreprocessService/TileImages``, ``internvl.encoder.v1.EncoderService/EmbedImages``
and ``internvl.decoder.v1.DecoderService/Generate`` / ``CountTokens``, served beside
``GatewayService`` on ``gateway.grpc_port`` (health and reflection list them), so an existing client of
a service only points at the gateway and adds metadata: ``authorization: Bearer <key>`` (or
``x-api-key``) of a key with the call's scope, and ``x-model`` when several models are served. Each
servicer reads the metadata, lets the caller in (``InternalDoor.enter``: nothing of the message is read
before), converts the message, makes one call to the door and converts the answer. The message's
``context`` field is never read: the gateway builds and signs the context from the credential.

``EmbedImages`` takes image bytes only: client-made tiles (the ``tiles`` source) are INVALID_ARGUMENT
through the door. Errors map to status codes through the server's ``ErrorInterceptor``.
"""

from __future__ import annotations

from typing import Any

from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from internvl.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from internvl.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from gateway.images import checked_image
from gateway.intake import api_key, requested_model, trace_context
from gateway.internal import Caller, InternalDoor
from gateway.tenancy.config import SCOPE_DECODE, SCOPE_EMBED, SCOPE_TILE
from services.common.errors import InvalidArgument
from services.common.pb import ref_from_pb, ref_to_pb, tiling_from_pb
from services.decoder.pb import decode_request_from_pb, event_to_pb, messages_from_pb
from services.preprocess.server import tiled_to_pb


def caller_of(context: Any) -> Caller:
    """The caller as its metadata and deadline describe it."""
    metadata = tuple(context.invocation_metadata() or ())
    remaining = context.time_remaining()
    return Caller(
        api_key=api_key(metadata),
        model=requested_model(metadata),
        # A deadline already passed still counts as one (the shortest), never as "none".
        timeout_s=None if remaining is None else max(remaining, 0.001),
        trace=trace_context(metadata),
    )


def _service(pb2: Any, name: str) -> str:
    return pb2.DESCRIPTOR.services_by_name[name].full_name


class PreprocessDoor(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, door: InternalDoor):
        self.door = door

    async def TileImages(self, request, context):  # noqa: N802 - gRPC method name
        entry = await self.door.enter(caller_of(context), SCOPE_TILE)
        default = entry.route.max_tiles_per_image
        items = [(checked_image(img.data), tiling_from_pb(img.tiling, default)) for img in request.images]
        tiled = await self.door.tile(entry, items)
        return preprocess_pb2.TileImagesResponse(images=[tiled_to_pb(t) for t in tiled])

    def registration(self):
        add = preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server
        return (add, self, _service(preprocess_pb2, "PreprocessService"))


class EncoderDoor(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, door: InternalDoor):
        self.door = door

    async def EmbedImages(self, request, context):  # noqa: N802 - gRPC method name
        entry = await self.door.enter(caller_of(context), SCOPE_EMBED)
        default = entry.route.max_tiles_per_image
        items = [
            (_image_bytes(i, img), tiling_from_pb(img.tiling, default))
            for i, img in enumerate(request.images)
        ]
        refs = await self.door.embed(entry, items, request.return_inline)
        return encoder_pb2.EmbedImagesResponse(embeddings=[ref_to_pb(r) for r in refs])

    def registration(self):
        add = encoder_pb2_grpc.add_EncoderServiceServicer_to_server
        return (add, self, _service(encoder_pb2, "EncoderService"))


def _image_bytes(i: int, image: encoder_pb2.ImageSource) -> bytes:
    which = image.WhichOneof("source")
    if which == "tiles":
        raise InvalidArgument(
            f"image {i}: tiles are not accepted through the gateway; send image bytes",
            reason="tiles_not_accepted",
        )
    if which != "data":
        raise InvalidArgument(f"image {i} has neither bytes nor tiles", reason="image_empty")
    return checked_image(image.data)


class DecoderDoor(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, door: InternalDoor):
        self.door = door

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        entry = await self.door.enter(caller_of(context), SCOPE_DECODE)
        decode = decode_request_from_pb(request)
        refs = [ref_from_pb(r) for r in request.images]
        async for event in self.door.generate(entry, decode, refs):
            yield event_to_pb(event)

    async def CountTokens(self, request, context):  # noqa: N802 - gRPC method name
        entry = await self.door.enter(caller_of(context), SCOPE_DECODE)
        messages = messages_from_pb(request.messages, len(request.image_tiles))
        total, image = await self.door.count_tokens(entry, messages, list(request.image_tiles))
        return decoder_pb2.CountTokensResponse(total_tokens=total, image_tokens=image)

    def registration(self):
        add = decoder_pb2_grpc.add_DecoderServiceServicer_to_server
        return (add, self, _service(decoder_pb2, "DecoderService"))


def internal_registrations(door: InternalDoor) -> list[tuple[Any, Any, str]]:
    """The three internal services for ``services.common.grpc_server.start_server``."""
    return [
        PreprocessDoor(door).registration(),
        EncoderDoor(door).registration(),
        DecoderDoor(door).registration(),
    ]
