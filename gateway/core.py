"""The gateway's request path: authenticate, admit, validate, embed every image, generate, meter.

Both public front ends (OpenAI-compatible HTTP and the gRPC ``GatewayService``) turn a request into a
``ChatRequest`` and iterate ``Gateway.chat``; nothing here knows HTTP or protobuf. Downstream services
are reached through small client interfaces (``EncoderClient``, ``DecoderClient``) with a Ray-handle
implementation in the deployment and in-process ones for standalone use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.intake import check_conversation, text_bytes
from gateway.tenancy.config import SCOPE_CHAT, Tenant, parse_key_id
from gateway.tenancy.keys import Authenticator, Principal
from gateway.tenancy.limiter import Limiter
from gateway.types import ChatChunk, ChatRequest, ImagePart, TokenLogprob, Usage, VideoPart
from gateway.videos import VideoPlan, plan_video, resolve_video, visual_item
from services.common import tracing
from services.common.context import ContextSigner, RequestContext
from services.common.errors import (
    DeadlineExceeded,
    EmbeddingUnresolvable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.limits import MAX_TILES_PER_IMAGE
from services.common.refs import EmbeddingRef
from services.common.types import TOKENS_PER_TILE, TilingParams, VideoClip
from services.decoder.types import ChatMessage, DecodeRequest, FinishReason, GenerationEvent
from services.preprocess.config import DecodeLimits
from services.preprocess.decoding import open_image
from services.preprocess.tiling import count_tiles

log = logging.getLogger(__name__)

# Upper bound of template tokens around each message (role markers, separators).
TEMPLATE_TOKENS_PER_MESSAGE = 16


class EncoderClient(Protocol):
    async def embed(
        self,
        images: Sequence[tuple[bytes, TilingParams] | VideoClip],
        ctx: RequestContext,
        inline: bool = False,
    ) -> list[EmbeddingRef]:
        """References for the images and videos (``VideoClip``); ``inline``: the tensors themselves (a second attempt, when the
        decoder could not read the first references)."""


class DecoderClient(Protocol):
    def generate(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[GenerationEvent]: ...

    async def count_tokens(
        self, messages: list[ChatMessage], image_tiles: list[int], ctx: RequestContext
    ) -> tuple[int, int]:
        """(total, image) tokens of the messages with images of ``image_tiles`` tiles."""


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
    operation: str = "chat"  # chat, or an internal call: tile, embed, decode, count_tokens
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
    _streamed: dict[int, int] = field(default_factory=dict, repr=False)  # completion tokens per choice
    _finished: int = field(default=0, repr=False)  # choices whose final event came

    def finish(self, usage: Usage) -> None:
        self.latency_s = time.monotonic() - self.started
        self.prompt_tokens = usage.prompt_tokens
        self.image_tokens = usage.image_tokens
        self.completion_tokens = usage.completion_tokens

    def count(self, event: GenerationEvent, usage: Usage) -> None:
        """What a generation event adds: counted as events arrive, so a cancelled request still
        accounts for its prompt (sent with the first token) and what it generated; a choice's final
        event's usage replaces that choice's count. The prompt counts once, whatever ``n``; the
        completions of all choices add up (as OpenAI counts them)."""
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
        streamed = self._streamed.get(event.index, 0) + len(event.token_ids)
        self._streamed[event.index] = streamed
        usage.completion_tokens += len(event.token_ids)
        if event.prompt_tokens is not None:
            usage.prompt_tokens = event.prompt_tokens
            usage.image_tokens = event.image_tokens or 0
        if event.usage is not None:
            u = event.usage
            usage.prompt_tokens = u.prompt_tokens
            usage.image_tokens = u.image_tokens
            usage.completion_tokens += u.completion_tokens - streamed
            self._streamed[event.index] = u.completion_tokens
            # one choice prefilled the prompt, the others found it cached: the request's own hits
            first = self._finished == 0
            usage.cached_prompt_tokens = (
                u.cached_prompt_tokens if first else min(usage.cached_prompt_tokens, u.cached_prompt_tokens)
            )
            self._finished += 1
            self.finish_reason = event.finish_reason.value if event.finish_reason else ""

    @property
    def choices_finished(self) -> int:
        return self._finished


@dataclass
class Call:
    """One admitted request in flight (``Gateway.admitted``): its context (unsigned: each hop signs
    it afresh), its root span, its record and the usage it reports."""

    ctx: RequestContext
    root: Any
    record: RequestRecord
    usage: Usage
    encoded_tokens: int = 0  # image tokens the encoder computed (cache hits cost nothing)

    def billed_tokens(self) -> int:
        """What the tenant's token budget is charged: the tokens the decoder reported, and at least the
        image tokens encoded for it, so a request refused after its images were encoded still pays
        for them."""
        return max(self.usage.prompt_tokens + self.usage.completion_tokens, self.encoded_tokens)


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
    async def authenticate(self, api_key: str | None, scope: str | None = None) -> Principal:
        """Who ``api_key`` is; with ``scope``, PermissionDenied unless the key holds it. Every failure
        is told to the observers (the audit log) by the presented key's id, never the key."""
        try:
            principal = self.keys.authenticate(api_key)
            if scope is not None:
                principal.require(scope)
            return principal
        except (Unauthenticated, PermissionDenied) as exc:
            self._notify("on_auth_failure", exc.reason, parse_key_id(api_key) if api_key else None)
            raise

    async def list_models(self, api_key: str | None) -> list[ModelRoute]:
        tenant = (await self.authenticate(api_key)).tenant
        return [r for name, r in self.routes.items() if tenant.allows_model(name)]

    async def chat(self, req: ChatRequest, principal: Principal) -> AsyncIterator[ChatChunk]:
        """Stream the answer to a caller the front end authenticated (``authenticate(key, SCOPE_CHAT)``,
        before it read the body). Raises ``MeshError`` subclasses before the first chunk for bad requests.

        The order is the cheapest refusal first, and nothing is embedded before everything that can be
        checked has been: the conversation, ``max_tokens``, the sampling values, the images counted and
        their tiles read from their headers, admission by the tenant's limits, remote images fetched
        (only now: after admission), and, with images, the exact prompt length against the context.
        """
        principal.require(SCOPE_CHAT)
        tenant = principal.tenant
        route = self.route(req.model, tenant)
        req.request_id = req.request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self._check_messages(req)
        max_tokens = self._max_tokens(req, tenant, route)
        tenant.check_n(req.n)
        decode = req.decode_request(max_tokens)
        decode.sampling.validate()
        decode.sampling.response_format = tenant.bound_response_format(decode.sampling.response_format)
        tilings, tiles = self._plan_images(req, tenant, route)
        estimate = text_token_bound(text_bytes(req), len(req.messages)) + sum(tiles) * TOKENS_PER_TILE
        async with self.admitted(
            tenant,
            route.name,
            req.request_id,
            self.timeout_s(req.timeout_s),
            estimate + req.n * max_tokens,  # the prompt once, every choice's completion
            span=tracing.SPAN_CHAT,
            trace=req.trace,
            attributes={tracing.ATTR_IMAGES: len(tilings)},
        ) as call:
            if req.images:
                await self._fetch_remote_images(req, tenant, tilings, tiles)
                await self._check_context(route, decode, tiles, call.ctx)
            self.keys.check(principal)
            async with contextlib.aclosing(self._run(req, route, call, tilings, decode)) as chunks:
                async for chunk in chunks:
                    # A key revoked while its request streams: the stream ends at the next token after
                    # the key set reloads (and the decoder's work is cancelled as the chain closes).
                    self.keys.check(principal)
                    yield chunk

    def timeout_s(self, requested: float | None) -> float:
        """A request's time limit: ``requested`` (else the default), never above the maximum."""
        return min(requested or self.limits.default_timeout_s, self.limits.max_timeout_s)

    @contextlib.asynccontextmanager
    async def admitted(
        self,
        tenant: Tenant,
        model: str,
        request_id: str,
        timeout_s: float,
        estimate: int,
        *,
        span: str,
        trace: dict[str, str] | None = None,
        attributes: dict[str, Any] | None = None,
        operation: str = "chat",
    ) -> AsyncIterator[Call]:
        """One request of ``tenant`` from admission to its record: a root span, admission through
        the limiter (``estimate`` tokens reserved, refunded at the end against the usage reported
        on the ``Call``), the deadline, and every observer told how it ended (``RequestRecord``)."""
        ctx = RequestContext(
            request_id=request_id,
            tenant=tenant.name,
            cache_namespace=tenant.cache_namespace,
            priority=tenant.priority,
            weight=tenant.weight,
            max_kv_share=tenant.max_kv_share,
            deadline=time.time() + timeout_s,
        )
        root = tracing.start_root_span(
            span,
            caller=trace or None,
            attributes={
                tracing.ATTR_REQUEST_ID: request_id,
                tracing.ATTR_TENANT: tenant.name,
                tracing.ATTR_MODEL: model,
                **(attributes or {}),
            },
        )
        record = RequestRecord(request_id, tenant.name, model, time.monotonic(), operation)
        usage = Usage()
        call = Call(ctx, root, record, usage)
        try:
            admission = await self._admit(tenant, estimate, root)
            record.queue_s = time.monotonic() - record.started
            try:
                async with asyncio.timeout(timeout_s):
                    yield call
            except TimeoutError:
                raise DeadlineExceeded(
                    f"request {request_id} exceeded its {timeout_s:.1f} s deadline"
                ) from None
            finally:
                await admission.complete(call.billed_tokens())
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

    async def _admit(self, tenant: Tenant, estimate: int, root: Any):
        span = tracing.start_span(tracing.SPAN_ADMISSION, parent=root)
        try:
            return await self.limiter.admit(tenant, estimate)
        except (ResourceExhausted, Unavailable) as exc:
            self._notify("on_rejected", tenant.name, exc.reason)
            raise
        finally:
            span.end()

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
        call: Call,
        tilings: list[TilingParams],
        decode: DecodeRequest,
    ) -> AsyncIterator[ChatChunk]:
        items = [visual_item(img, t) for img, t in zip(req.images, tilings)]
        record = call.record
        for attempt in (1, 2):
            # A second attempt asks for the tensors themselves: the first references could not be read.
            refs = await self.embed(route, items, call.ctx, call.root, inline=attempt == 2) if items else []
            record.images = len(refs)
            record.tiles = sum(r.tiles for r in refs)
            record.tile_counts = [r.tiles for r in refs]
            record.cache_hits = sum(1 for r in refs if r.cache_hit)
            call.encoded_tokens += TOKENS_PER_TILE * sum(r.tiles for r in refs if not r.cache_hit)
            started = False
            gen_span = tracing.start_span(tracing.SPAN_GENERATE, parent=call.root)
            try:
                gen_ctx = self.signer.sign(replace(call.ctx, trace=tracing.carrier_of(gen_span)))
                async for event in route.decoder.generate(decode, refs, gen_ctx):
                    started = True
                    chunk = _chunk(req.request_id, event)
                    record.count(event, call.usage)
                    if chunk.finish_reason is FinishReason.DEADLINE:
                        raise DeadlineExceeded(
                            f"request {req.request_id} reached its deadline in the decoder"
                        )
                    if record.choices_finished == decode.n and event.finished:  # the request's last chunk
                        chunk.usage = replace(call.usage, cached_images=record.cache_hits)
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

    async def embed(
        self,
        route: ModelRoute,
        items: Sequence[tuple[bytes, TilingParams]],
        ctx: RequestContext,
        parent: Any,
        inline: bool = False,
    ) -> list[EmbeddingRef]:
        """The references of ``items`` from the route's encoder, under a span of ``parent``, with
        ``ctx`` signed for the hop."""
        span = tracing.start_span(
            tracing.SPAN_EMBED, parent=parent, attributes={tracing.ATTR_IMAGES: len(items)}
        )
        try:
            refs = await route.encoder.embed(
                list(items), self.signer.sign(replace(ctx, trace=tracing.carrier_of(span))), inline=inline
            )
            span.set_attribute(tracing.ATTR_TILES, sum(r.tiles for r in refs))
            span.set_attribute(tracing.ATTR_CACHE_HIT, all(r.cache_hit for r in refs))
            return refs
        except BaseException as exc:
            tracing.record_error(span, exc)
            raise
        finally:
            span.end()

    async def _fetch_remote_images(
        self, req: ChatRequest, tenant: Tenant, tilings: list[TilingParams], tiles: list[int]
    ) -> None:
        """Fetch the remote images (after admission) and put their real tile counts in ``tiles`` (which
        held each one's most), checked against the tenant's cap again."""
        remote = [(k, img) for k, img in enumerate(req.images) if img.url]
        if not remote:
            return
        for k, img in remote:
            img.data = await self.fetcher.fetch(img.url)
            if isinstance(img, VideoPart):
                tiles[k] = resolve_video(k, tilings[k], img.data)
            else:
                tiles[k] = self._image_tiles(k, img.data, tilings[k])
        tenant.check_request_size(tiles=sum(tiles))

    async def _check_context(
        self, route: ModelRoute, decode: DecodeRequest, tiles: list[int], ctx: RequestContext
    ) -> None:
        """The exact prompt (the decoder's template and tokenizer) plus ``max_tokens`` within the
        context, before any image is embedded (the decoder checks it again, but only after the encoder's
        work would have been spent)."""
        total, _ = await route.decoder.count_tokens(decode.messages, tiles, self.signer.sign(ctx))
        if total + (decode.max_tokens or 0) > route.max_model_len:
            raise InvalidArgument(
                f"max_tokens={decode.max_tokens} plus the {total}-token prompt exceed the context of "
                f"{route.max_model_len}",
                reason="context_length_exceeded",
            )

    def route(self, model: str, tenant: Tenant) -> ModelRoute:
        """The route of ``model``; NotFound, alike, for a model not served and one ``tenant`` may not use."""
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
    ) -> tuple[list[TilingParams | VideoPlan], list[int]]:
        """Tiling per image (a ``VideoPlan`` per video) (capped by model and tenant) and its tiles, from headers only; a remote
        image (not fetched yet) counts its most, ``max_num`` + a thumbnail."""
        images: list[ImagePart | VideoPart] = req.images
        tenant.check_request_size(images=len(images))
        if any(img.url for img in images) and self.fetcher is None:
            raise InvalidArgument(
                "remote image URLs are not fetched by this server", reason="remote_images_disabled"
            )
        tilings, tiles = [], []
        for k, img in enumerate(images):
            if isinstance(img, VideoPart):
                plan, n = plan_video(k, img, route.max_tiles_per_image)
                tenant.check_request_size(
                    frames=sum(p.frames for p in [*tilings, plan] if isinstance(p, VideoPlan))
                )
                tilings.append(plan)
                tiles.append(n)
                continue
            max_num = route.max_tiles_per_image if img.max_num is None else img.max_num
            if not 1 <= max_num <= MAX_TILES_PER_IMAGE:
                raise InvalidArgument(
                    f"image {k}: max_num must be in 1..{MAX_TILES_PER_IMAGE}, got {max_num}",
                    reason="invalid_max_num",
                )
            params = TilingParams(max_num=min(max_num, route.max_tiles_per_image)).validate()
            tiles.append(params.max_num + 1 if img.url else self._image_tiles(k, img.data, params))
            tilings.append(params)
        # A remote image counts one tile against the cap until it is fetched (then its real count).
        tenant.check_request_size(tiles=sum(1 if img.url else n for img, n in zip(images, tiles)))
        return tilings, tiles

    def plan_tiles(self, tenant: Tenant, items: Sequence[tuple[bytes, TilingParams]]) -> list[int]:
        """The tiles of each image, from its header only (before any work); InvalidArgument past the
        tenant's caps of images and tiles per request."""
        tenant.check_request_size(images=len(items))
        counts = [self._image_tiles(k, data, params) for k, (data, params) in enumerate(items)]
        tenant.check_request_size(tiles=sum(counts))
        return counts

    def _image_tiles(self, k: int, data: bytes, params: TilingParams) -> int:
        try:
            header = open_image(data, self._decode_limits)
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {k}: {exc.message}", reason=exc.reason) from None
        return count_tiles(header.width, header.height, params)


def text_token_bound(text_bytes: int, messages: int) -> int:
    """An upper bound of prompt text tokens without the tokenizer: a byte-level BPE emits at most one
    token per UTF-8 byte; reserved tokens are refunded at completion."""
    return text_bytes + TEMPLATE_TOKENS_PER_MESSAGE * (messages + 2)


def _chunk(request_id: str, event: GenerationEvent) -> ChatChunk:
    if event.error:
        from services.common.errors import MeshError

        raise MeshError(event.error)
    return ChatChunk(
        request_id=request_id,
        index=event.index,
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
    )


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return getattr(exc, "reason", None) or "error"
