"""Preprocess, encoder and decoder clients of the gateway over Ray DeploymentHandles (in-process ones,
for a gateway wired to cores in the same process, are in ``mesh.local_clients``).

The handle clients pass embedding references through unread (a Ray ``ObjectRef`` inside a reference
stays a reference). A decoder client sends a ``DecodeRequest`` and streams ``GenerationEvent`` s back,
the same objects over a handle as in process; closing its stream cancels the request in the decoder.
Tiling and embedding are idempotent (content-addressed), so a call whose replica dies is tried once
more; a stream cannot be resumed elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.common.context import RequestContext
from services.common.errors import MeshError, ResourceExhausted, Unavailable
from services.common.refs import EmbeddingRef
from services.common.types import TiledImage, TilingParams
from services.decoder.types import ChatMessage, DecodeRequest, GenerationEvent


def _replica_failures() -> tuple[type[BaseException], ...]:
    """Ray's exceptions for a replica that died or is gone (as opposed to an error it raised)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )


def _replicas_own(exc: MeshError) -> MeshError:
    """The error a replica raised. Ray raises a subclass of both ``RayTaskError`` and the replica's error
    class, whose class attributes (``reason``) shadow those of the error itself, held as ``cause``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MeshError) else exc


def _unavailable(what: str, exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the {what} replica failed ({type(exc).__name__}); retry the request", reason=f"{what}_unavailable"
    )


async def _call(what: str, busy: str, method: Any, *args: Any, attempts: int = 2) -> Any:
    """``method.remote(*args)``: a full pool is RESOURCE_EXHAUSTED (``busy``); a dead replica is tried
    ``attempts`` times in all (Serve routes the retry to another replica, or to the replacement), then
    UNAVAILABLE. Only for idempotent calls when ``attempts`` > 1."""
    from ray.serve.exceptions import BackPressureError

    failures = _replica_failures()
    for attempt in range(1, attempts + 1):
        try:
            return await method.remote(*args)
        except BackPressureError as exc:
            raise ResourceExhausted(
                f"the {busy} are saturated", reason=f"{what}_busy", retry_after=1.0
            ) from exc
        except MeshError as exc:
            raise _replicas_own(exc) from None
        except failures as exc:
            if attempt == attempts:
                raise _unavailable(what, exc) from exc
    raise AssertionError("unreachable")


class HandlePreprocessClient:
    """Tiles images through the preprocess application (the door's ``TileImages``)."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def tile(
        self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext
    ) -> list[TiledImage]:
        return await _call("preprocess", "preprocess workers", self.handle.tile, list(items), ctx)


class HandleEncoderClient:
    """Embedding is idempotent (content-addressed): a request whose encoder replica dies is tried once
    more (Serve routes it to another replica, or to the replacement); then it is UNAVAILABLE."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def embed(
        self, images: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext, inline: bool = False
    ) -> list[EmbeddingRef]:
        return await _call("encoder", "vision encoders", self.handle.embed, list(images), ctx, inline)


class HandleDecoderClient:
    def __init__(self, handle: Any):
        self.handle = handle.options(stream=True)
        self.info_handle = handle

    async def generate(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[GenerationEvent]:
        from ray.serve.exceptions import BackPressureError

        failures = _replica_failures()
        stream = self.handle.generate.remote(request, refs, ctx)
        finished = False
        try:
            async for event in stream:
                finished = event.finished
                yield event
        except BackPressureError as exc:
            raise ResourceExhausted(
                "the decoders are saturated", reason="decoder_busy", retry_after=1.0
            ) from exc
        except MeshError as exc:
            raise _replicas_own(exc) from None
        except failures as exc:
            # A stream cannot be resumed elsewhere: it ends with an error (an error event for a
            # streaming client, 503 otherwise); new requests go to the replacement replica.
            raise _unavailable("decoder", exc) from exc
        finally:
            if not finished:
                stream.cancel()  # the client went away: free the decoder's work now

    async def count_tokens(
        self, messages: list[ChatMessage], image_tiles: list[int], ctx: RequestContext
    ) -> tuple[int, int]:
        method = self.info_handle.count_tokens
        return tuple(await _call("decoder", "decoders", method, messages, image_tiles, ctx))

    async def info(self) -> dict[str, Any]:
        return await self.info_handle.info.remote()
