"""The one door for internal clients: the preprocess, encoder and decoder APIs behind the gateway.

Internal clients of the organisation call ``TileImages``, ``EmbedImages``, ``Generate`` and
``CountTokens`` on the gateway's gRPC port (``gateway.internal_api`` is the protobuf face of this
module). Each call is treated as a chat request is:

1. the credential (``authorization: Bearer`` / ``x-api-key``) is authenticated and must hold the call's
   scope (``tile``, ``embed``, ``decode``): UNAUTHENTICATED without a valid key, PERMISSION_DENIED
   (``scope_not_granted``) without the scope;
2. the model is the ``x-model`` metadata (needed only when several are served); one the tenant may not
   use is NOT_FOUND, as for chat;
3. the tenant's per-request caps are checked before any work (images, and tiles counted from the image
   headers; ``max_tokens``; ``n``, at most the tenant's ``max_n``), then admission through the limiter
   (requests/s, concurrency, and for ``Generate`` the token budget: text bound + image tokens +
   ``n`` x ``max_tokens``);
4. the request context is built from the credential alone (tenant, cache namespace, priority, a fresh
   request id, the gRPC deadline capped by ``gateway.max_timeout_s``) and signed for each hop; a
   ``context`` the client put in its message is never read;
5. the call goes to the services over their DeploymentHandles, and every observer (usage records,
   metrics, audit) gets a ``RequestRecord`` naming the operation: tiles are billed for ``tile`` and
   ``embed``, tokens for ``decode``.

Embeddings leave as ``cache`` references (keys in the tenant's namespace) or inline tensors; a Ray
``object`` reference never leaves (the encoder is asked again for the tensors themselves).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from gateway.core import Call, Gateway, ModelRoute, text_token_bound
from gateway.tenancy.keys import Principal
from services.common import tracing
from services.common.context import RequestContext
from services.common.errors import InvalidArgument, Unavailable
from services.common.refs import KIND_OBJECT, EmbeddingRef
from services.common.types import TiledImage, TilingParams
from services.decoder.bounds import text_bytes
from services.decoder.types import ChatMessage, DecodeRequest, FinishReason, GenerationEvent

OP_TILE, OP_EMBED, OP_DECODE, OP_COUNT = "tile", "embed", "decode", "count_tokens"


class PreprocessClient(Protocol):
    async def tile(
        self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext
    ) -> list[TiledImage]: ...


@dataclass(frozen=True)
class Caller:
    """What an internal call's metadata says: the credential, the model, the time it allows (its gRPC
    deadline, None without one) and its trace context."""

    api_key: str | None
    model: str = ""
    timeout_s: float | None = None
    trace: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """A caller let in: who it is (``Principal``) and the model it reaches."""

    caller: Caller
    principal: Principal
    route: ModelRoute


class InternalDoor:
    """The internal APIs over the gateway's machinery (``Gateway``: keys, limiter, signer, observers)."""

    def __init__(self, gateway: Gateway, preprocess: PreprocessClient | None = None):
        self.gateway = gateway
        self.preprocess = preprocess

    async def enter(self, caller: Caller, scope: str) -> Entry:
        """Authenticate ``caller`` for ``scope`` and find its model; first, before its message is read."""
        principal = await self.gateway.authenticate(caller.api_key, scope)
        model = caller.model
        if not model:
            if len(self.gateway.routes) != 1:
                raise InvalidArgument(
                    "several models are served: name one in the 'x-model' metadata", reason="model_required"
                )
            model = next(iter(self.gateway.routes))
        return Entry(caller, principal, self.gateway.route(model, principal.tenant))

    # -- the calls -----------------------------------------------------------------------------
    async def tile(self, entry: Entry, items: Sequence[tuple[bytes, TilingParams]]) -> list[TiledImage]:
        if self.preprocess is None:
            raise Unavailable(
                "this gateway has no preprocess application to tile with", reason="no_preprocess"
            )
        self.gateway.plan_tiles(entry.principal.tenant, items)
        async with self._admitted(entry, OP_TILE, "TileImages", 0) as call:
            tiled = await self.preprocess.tile(items, self._signed(call.ctx, call.root))
            _bill_tiles(call, [t.num_tiles for t in tiled])
            return tiled

    async def embed(
        self, entry: Entry, items: Sequence[tuple[bytes, TilingParams]], inline: bool
    ) -> list[EmbeddingRef]:
        self.gateway.plan_tiles(entry.principal.tenant, items)
        async with self._admitted(entry, OP_EMBED, "EmbedImages", 0) as call:
            refs = await self.gateway.embed(entry.route, items, call.ctx, call.root, inline=inline)
            _bill_tiles(call, [r.tiles for r in refs])
            call.record.cache_hits = sum(1 for r in refs if r.cache_hit)
            if any(r.kind == KIND_OBJECT for r in refs):
                # The shared cache did not take them (Redis down, or an entry over its size bound): a
                # Ray object reference cannot leave over gRPC, so ask for the tensors themselves.
                refs = await self.gateway.embed(entry.route, items, call.ctx, call.root, inline=True)
            return refs

    async def generate(
        self, entry: Entry, request: DecodeRequest, refs: list[EmbeddingRef]
    ) -> AsyncIterator[GenerationEvent]:
        """The decoder's events as they come, for references in the caller's own namespace (any other
        resolves to the decoder's one uniform error)."""
        tenant, route = entry.principal.tenant, entry.route
        tenant.check_request_size(images=len(refs), tiles=sum(r.tiles for r in refs))
        max_tokens = tenant.max_tokens(
            request.max_tokens, context=route.max_model_len, default=self.gateway.limits.default_max_tokens
        )
        tenant.check_n(request.n)
        sampling = replace(
            request.sampling, response_format=tenant.bound_response_format(request.sampling.response_format)
        )
        request = replace(request, max_tokens=max_tokens, sampling=sampling)
        estimate = (
            text_token_bound(text_bytes(request.messages), len(request.messages))
            + sum(r.tokens for r in refs)
            + request.n * max_tokens
        )
        async with self._admitted(entry, OP_DECODE, "Generate", estimate) as call:
            call.record.images = len(refs)
            span = tracing.start_span(tracing.SPAN_GENERATE, parent=call.root)
            try:
                async for event in route.decoder.generate(request, refs, self._signed(call.ctx, span)):
                    call.record.count(event, call.usage)
                    if event.error:
                        call.record.status = "error"
                    elif event.finish_reason is FinishReason.DEADLINE:
                        call.record.status = "deadline_exceeded"
                    yield event
            finally:
                span.end()

    async def count_tokens(
        self, entry: Entry, messages: list[ChatMessage], image_tiles: list[int]
    ) -> tuple[int, int]:
        entry.principal.tenant.check_request_size(images=len(image_tiles), tiles=sum(image_tiles))
        async with self._admitted(entry, OP_COUNT, "CountTokens", 0) as call:
            ctx = self._signed(call.ctx, call.root)
            return await entry.route.decoder.count_tokens(messages, image_tiles, ctx)

    # -- helpers -------------------------------------------------------------------------------
    def _admitted(self, entry: Entry, operation: str, method: str, estimate: int):
        caller = entry.caller
        return self.gateway.admitted(
            entry.principal.tenant,
            entry.route.name,
            f"{operation}-{uuid.uuid4().hex[:24]}",
            self.gateway.timeout_s(caller.timeout_s),
            estimate,
            span=tracing.SPAN_INTERNAL,
            trace=caller.trace,
            attributes={tracing.ATTR_RPC_METHOD: method},
            operation=operation,
        )

    def _signed(self, ctx: RequestContext, span) -> RequestContext:
        return self.gateway.signer.sign(replace(ctx, trace=tracing.carrier_of(span)))


def _bill_tiles(call: Call, counts: list[int]) -> None:
    call.record.images = len(counts)
    call.record.tiles = sum(counts)
    call.record.tile_counts = counts
