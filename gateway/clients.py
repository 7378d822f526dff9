"""Encoder and decoder clients of the gateway over Ray DeploymentHandles (in-process ones, for a gateway
wired to cores in the same process, are in ``mesh.local_clients``).

The handle clients pass embedding references through unread (a Ray ``ObjectRef`` inside a reference
stays a reference). A decoder client sends a ``DecodeRequest`` and streams ``GenerationEvent`` s back,
the same objects over a handle as in process; closing its stream cancels the request in the decoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from services.common.context import RequestContext
from services.common.errors import MeshError, ResourceExhausted, Unavailable
from services.common.refs import EmbeddingRef
from services.common.types import TilingParams
from services.decoder.types import DecodeRequest, GenerationEvent


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


class HandleEncoderClient:
    """Embedding is idempotent (content-addressed): a request whose encoder replica dies is tried once
    more (Serve routes it to another replica, or to the replacement); then it is UNAVAILABLE."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def embed(
        self, images: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext, inline: bool = False
    ) -> list[EmbeddingRef]:
        from ray.serve.exceptions import BackPressureError

        failures = _replica_failures()
        for attempt in (1, 2):
            try:
                return await self.handle.embed.remote(list(images), ctx, inline)
            except BackPressureError as exc:
                raise ResourceExhausted(
                    "the vision encoders are saturated", reason="encoder_busy", retry_after=1.0
                ) from exc
            except MeshError as exc:
                raise _replicas_own(exc) from None
            except failures as exc:
                if attempt == 2:
                    raise _unavailable("encoder", exc) from exc
        raise AssertionError("unreachable")


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

    async def info(self) -> dict[str, Any]:
        return await self.info_handle.info.remote()
