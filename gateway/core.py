"""The gateway's request path: authenticate, admit, validate, embed every image, generate, meter.

Both public front ends (OpenAI-compatible HTTP and the gRPC ``GatewayService``) turn a request into a
``ChatRequest`` and iterate ``Gateway.chat``; nothing here knows HTTP or protobuf. Downstream services
are reached through small client interfaces (``EncoderClient``, ``DecoderClient``) with a Ray-handle
implementation in the deployment and in-process ones for standalone use.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.intake import check_conversation
from gateway.tenancy.config import Tenant, parse_key_id
from gateway.tenancy.keys import Authenticator
from gateway.tenancy.limiter import Limiter
from gateway.types import ChatChunk, ChatRequest, ImagePart, TextPart, TokenLogprob, Usage
from services.common import tracing
from services.common.context import ContextSigner, RequestContext
from services.common.errors import (
    DeadlineExceeded,
    EmbeddingUnresolvable,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.limits import MAX_TILES_PER_IMAGE
from services.common.refs import EmbeddingRef
from services.common.types import TOKENS_PER_TILE, TilingParams
from services.decoder.types import DecodeRequest, FinishReason, GenerationEvent
from services.preprocess.config import DecodeLimits
from services.preprocess.decoding import open_image
from services.preprocess.tiling import count_tiles

log = logging.getLogger(__name__)

# Upper bound of template tokens around each message (role markers, separators).
TEMPLATE_TOKENS_PER_MESSAGE = 16


class EncoderClient(Protocol):
    async def embed(
        self, images: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext, inline: bool = False
    ) -> list[EmbeddingRef]:
        """References for the images; ``inline``: the tensors themselves (a second attempt, when the
        decoder could not read the first references)."""


class DecoderClient(Protocol):
    def generate(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[GenerationEvent]: ...


@dataclass
class ModelRoute:
    name: str
    encoder: EncoderClient
    decoder: DecoderClient
    max_tiles_per_image: int = 12
    max_model_len: int = 8192


@dataclass
class GatewayLimits:
    """The gateway's defaults; the bounds of a request are ``services.common.limits``."""

    default_timeout_s: float = 120.0
    max_timeout_s: float = 600.0
    default_max_tokens: int = 512


@dataclass
class RequestRecord:
    """What one finished request did: for metrics, usage records and audit (``GatewayObserver``)."""

    request_id: str
    tenant: str
    model: str
    started: float
    status: str = "ok"
    finish_reason: str = ""
    images: int = 0
    tiles: int = 0
    tile_counts: list[int] = field(default_factory=list)
    cache_hits: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float = 0.0

    def finish(self, usage: Usage) -> None:
        self.latency_s = time.monotonic() - self.started
        self.prompt_tokens = usage.prompt_tokens
        self.image_tokens = usage.image_tokens
        self.completion_tokens = usage.completion_tokens


class GatewayObserver(Protocol):
    """Told about every finished request. An observer may also define ``on_auth_failure(reason, key_id)``
    (``key_id`` is the public part of the presented key or None, never the key) and
    ``on_rejected(tenant, reason)`` (a limit refused admission); both are optional."""

    def on_complete(self, record: RequestRecord) -> None: ...


class Gateway:
    def __init__(
        self,
        routes: Sequence[ModelRoute],
        keys: Authenticator,
        limiter: Limiter,
        limits: GatewayLimits | None = None,
        observers: Sequence[GatewayObserver] = (),
        fetcher: Any = None,
        *,
        signer: ContextSigner,
    ):
        self.routes = {r.name: r for r in routes}
        self.signer = signer  # signs the context of every hop (services.common.context)
        self.keys = keys
        self.limiter = limiter
        self.limits = limits or GatewayLimits()
        self.observers = list(observers)
        self.fetcher = fetcher  # a RemoteImageFetcher where remote images are enabled, else None
        self._decode_limits = DecodeLimits()

    # -- public -------------------------------------------------------------------------------
    async def authenticate(self, api_key: str | None) -> Tenant:
        try:
            return self.keys.authenticate(api_key)
        except Unauthenticated as exc:
            self._notify("on_auth_failure", exc.reason, parse_key_id(api_key) if api_key else None)
            raise

    async def list_models(self, api_key: str | None) -> list[ModelRoute]:
        tenant = await self.authenticate(api_key)
        return [r for name, r in self.routes.items() if tenant.allows_model(name)]

    async def chat(self, req: ChatRequest, api_key: str | None) -> AsyncIterator[ChatChunk]:
        """Stream the answer. Raises ``MeshError`` subclasses before the first chunk for bad requests."""
        tenant = await self.authenticate(api_key)
        route = self._route(req.model, tenant)
        req.request_id = req.request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self._check_messages(req)
        max_tokens = self._max_tokens(req, tenant, route)
        await self._fetch_remote_images(req)
        tilings, image_tokens = self._plan_images(req, tenant, route)
        timeout = min(req.timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
        ctx = RequestContext(
            request_id=req.request_id,
            tenant=tenant.name,
            cache_namespace=tenant.cache_namespace,
            priority=tenant.priority,
            deadline=time.time() + timeout,
        )
        estimate = _text_token_bound(req) + image_tokens + max_tokens
        root = tracing.start_root_span(
            tracing.SPAN_CHAT,
            caller=req.trace or None,
            attributes={
                tracing.ATTR_REQUEST_ID: req.request_id,
                tracing.ATTR_TENANT: tenant.name,
                tracing.ATTR_MODEL: route.name,
                tracing.ATTR_IMAGES: len(tilings),
            },
        )
        record = RequestRecord(req.request_id, tenant.name, route.name, started=time.monotonic())
        usage = Usage()
        try:
            admission_span = tracing.start_span(tracing.SPAN_ADMISSION, parent=root)
            try:
                admission = await self.limiter.admit(tenant, estimate)
            except (ResourceExhausted, Unavailable) as exc:
                self._notify("on_rejected", tenant.name, exc.reason)
                raise
            finally:
                admission_span.end()
            record.queue_s = time.monotonic() - record.started
            try:
                async with asyncio.timeout(timeout):
                    async for chunk in self._run(req, route, ctx, tilings, max_tokens, usage, root, record):
                        yield chunk
            except TimeoutError:
                raise DeadlineExceeded(
                    f"request {req.request_id} exceeded its {timeout:.1f} s deadline"
                ) from None
            finally:
                await admission.complete(usage.prompt_tokens + usage.completion_tokens)
        except BaseException as exc:
            record.status = _status_of(exc)
            tracing.record_error(root, exc)
            raise
        finally:
            record.finish(usage)
            root.set_attribute(tracing.ATTR_PROMPT_TOKENS, usage.prompt_tokens)
            root.set_attribute(tracing.ATTR_COMPLETION_TOKENS, usage.completion_tokens)
            root.end()
            for observer in self.observers:
                observer.on_complete(record)

    def _notify(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if method is not None:
                method(*args)

    # -- steps --------------------------------------------------------------------------------
    async def _run(
        self,
        req: ChatRequest,
        route: ModelRoute,
        ctx: RequestContext,
        tilings: list[TilingParams],
        max_tokens: int,
        usage: Usage,
        root: Any,
        record: RequestRecord,
    ) -> AsyncIterator[ChatChunk]:
        images = req.images
        decode = req.decode_request(max_tokens)
        for attempt in (1, 2):
            # A second attempt asks for the tensors themselves: the first references could not be read.
            refs = await self._embed(route, images, tilings, ctx, root, inline=attempt == 2) if images else []
            record.images = len(refs)
            record.tiles = sum(r.tiles for r in refs)
            record.tile_counts = [r.tiles for r in refs]
            record.cache_hits = sum(1 for r in refs if r.cache_hit)
            started = False
            gen_span = tracing.start_span(tracing.SPAN_GENERATE, parent=root)
            try:
                gen_ctx = self.signer.sign(replace(ctx, trace=tracing.carrier_of(gen_span)))
                async for event in route.decoder.generate(decode, refs, gen_ctx):
                    if not started:
                        record.ttft_s = time.monotonic() - record.started
                    started = True
                    chunk = _chunk(req.request_id, event)
                    # Counted as they arrive so a cancelled request still accounts for its prompt (sent
                    # with the first token) and what it generated; the final event's usage replaces them.
                    usage.completion_tokens += len(event.token_ids)
                    if event.prompt_tokens is not None:
                        usage.prompt_tokens = event.prompt_tokens
                        usage.image_tokens = event.image_tokens or 0
                    if chunk.finish_reason is FinishReason.DEADLINE:
                        raise DeadlineExceeded(
                            f"request {req.request_id} reached its deadline in the decoder"
                        )
                    if chunk.usage is not None:
                        chunk.usage.cached_images = record.cache_hits
                        usage.prompt_tokens = chunk.usage.prompt_tokens
                        usage.image_tokens = chunk.usage.image_tokens
                        usage.completion_tokens = chunk.usage.completion_tokens
                        usage.cached_prompt_tokens = chunk.usage.cached_prompt_tokens
                        record.finish_reason = chunk.finish_reason.value if chunk.finish_reason else ""
                    yield chunk
                return
            except EmbeddingUnresolvable:
                # The embedding vanished between encode and decode (evicted, or its Ray owner died):
                # encode again, once, if nothing has been streamed yet.
                if started or attempt == 2:
                    raise
                log.warning("request %s: embeddings unresolvable, encoding again", req.request_id)
            finally:
                gen_span.end()

    async def _embed(self, route, images, tilings, ctx, root, inline: bool = False) -> list[EmbeddingRef]:
        span = tracing.start_span(
            tracing.SPAN_EMBED, parent=root, attributes={tracing.ATTR_IMAGES: len(images)}
        )
        try:
            refs = await route.encoder.embed(
                [(img.data, t) for img, t in zip(images, tilings)],
                self.signer.sign(replace(ctx, trace=tracing.carrier_of(span))),
                inline=inline,
            )
            span.set_attribute(tracing.ATTR_TILES, sum(r.tiles for r in refs))
            span.set_attribute(tracing.ATTR_CACHE_HIT, all(r.cache_hit for r in refs))
            return refs
        except BaseException as exc:
            tracing.record_error(span, exc)
            raise
        finally:
            span.end()

    async def _fetch_remote_images(self, req: ChatRequest) -> None:
        remote = [img for img in req.images if img.url]
        if not remote:
            return
        if self.fetcher is None:
            raise InvalidArgument(
                "remote image URLs are not fetched by this server", reason="remote_images_disabled"
            )
        for img in remote:
            img.data = await self.fetcher.fetch(img.url)

    def _route(self, model: str, tenant: Tenant) -> ModelRoute:
        route = self.routes.get(model)
        if route is None or not tenant.allows_model(model):
            raise NotFound(
                f"model {model!r} does not exist or you do not have access to it", reason="model_not_found"
            )
        return route

    def _check_messages(self, req: ChatRequest) -> None:
        check_conversation(req)

    def _max_tokens(self, req: ChatRequest, tenant: Tenant, route: ModelRoute) -> int:
        return tenant.max_tokens(
            req.max_tokens, context=route.max_model_len, default=self.limits.default_max_tokens
        )

    def _plan_images(
        self, req: ChatRequest, tenant: Tenant, route: ModelRoute
    ) -> tuple[list[TilingParams], int]:
        """Tiling per image (capped by model and tenant) and the image tokens, from headers only."""
        images: list[ImagePart] = req.images
        tenant.check_request_size(images=len(images))
        tilings, tiles = [], 0
        for k, img in enumerate(images):
            max_num = route.max_tiles_per_image if img.max_num is None else img.max_num
            if not 1 <= max_num <= MAX_TILES_PER_IMAGE:
                raise InvalidArgument(
                    f"image {k}: max_num must be in 1..{MAX_TILES_PER_IMAGE}, got {max_num}",
                    reason="invalid_max_num",
                )
            params = TilingParams(max_num=min(max_num, route.max_tiles_per_image)).validate()
            try:
                header = open_image(img.data, self._decode_limits)
            except InvalidArgument as exc:
                raise InvalidArgument(f"image {k}: {exc.message}", reason=exc.reason) from None
            tiles += count_tiles(header.width, header.height, params)
            tilings.append(params)
        tenant.check_request_size(tiles=tiles)
        return tilings, tiles * TOKENS_PER_TILE


def _text_token_bound(req: ChatRequest) -> int:
    """An upper bound of prompt text tokens without the tokenizer: a byte-level BPE emits at most one
    token per UTF-8 byte; reserved tokens are refunded at completion."""
    text = sum(
        len(p.text.encode("utf-8", "surrogatepass"))
        for m in req.messages
        for p in m.parts
        if isinstance(p, TextPart)
    )
    return text + TEMPLATE_TOKENS_PER_MESSAGE * (len(req.messages) + 2)


def _chunk(request_id: str, event: GenerationEvent) -> ChatChunk:
    if event.error:
        from services.common.errors import MeshError

        raise MeshError(event.error)
    u = event.usage
    return ChatChunk(
        request_id=request_id,
        text=event.text,
        logprobs=[
            TokenLogprob(
                lp.token,
                lp.logprob,
                list(lp.token_bytes),
                [(t.token, t.logprob, list(t.token_bytes)) for t in lp.top],
            )
            for lp in event.logprobs or ()
        ],
        finish_reason=event.finish_reason,
        usage=Usage(
            prompt_tokens=u.prompt_tokens,
            image_tokens=u.image_tokens,
            completion_tokens=u.completion_tokens,
            cached_prompt_tokens=u.cached_prompt_tokens,
        )
        if u is not None
        else None,
    )


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return getattr(exc, "reason", None) or "error"
