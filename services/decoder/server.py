"""The decoder's service boundary: a ``DecodeRequest`` and embedding references in, events out.

``DecoderFrontend`` turns a :class:`DecodeRequest` (typed chat messages, sampling values, ``max_tokens``),
its embedding references and the request context into the engine's ``GenerateInput`` — resolving every
reference, whatever its kind — and streams the engine's ``GenerationEvent`` s back with the token strings
of their log-probabilities filled in; a request with ``n`` > 1 runs as ``n`` samples whose streams are
merged (``services.decoder.samples``). The same objects travel over Ray handles. ``DecoderServicer`` is the
gRPC face of the same thing: protobuf → ``services.decoder.pb`` → the frontend → protobuf.

The frontend is the decoder's one entry point, for handles and gRPC alike: it verifies the gateway's
signature on the request context before anything else (``services.common.context``), checks the
request against the mesh's bounds (``services.decoder.bounds``), and takes the tenant's namespace and
priority from the verified context only. Embedding references resolve only inside that namespace, and
an inline tensor's prefix-cache identity is the hash of its bytes, never a key the caller names.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc

from services.common import tracing
from services.common.context import ContextSigner, RequestContext
from services.common.limits import check_image_tiles
from services.common.pb import context_from_pb, ref_from_pb
from services.common.refs import KIND_INLINE, EmbeddingRef
from services.decoder.bounds import check_messages, check_request
from services.decoder.pb import decode_request_from_pb, event_to_pb, messages_from_pb
from services.decoder.samples import generate_samples
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    GenerateInput,
    GenerationEvent,
    ImageEmbedding,
    TokenLogprob,
    TopLogprob,
    entry_frames,
    template_messages,
)
from services.embedding_cache.resolver import EmbeddingResolver

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


class DecoderFrontend:
    def __init__(self, core: Any, resolver: EmbeddingResolver, signer: ContextSigner):
        self.core = core
        self.resolver = resolver
        self.signer = signer

    async def generate(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[GenerationEvent]:
        ctx = self.signer.verify(ctx)
        check_request(request, refs)
        root = tracing.start_span(
            tracing.SPAN_DECODER,
            carrier=ctx.trace or None,
            server=True,
            attributes={tracing.ATTR_REQUEST_ID: ctx.request_id, tracing.ATTR_IMAGES: len(refs)},
        )
        phase = tracing.start_span(tracing.SPAN_PREFILL, parent=root)
        first, completion = True, 0
        try:
            inp = await self._input(request, refs, ctx)
            async for event in generate_samples(self.core, inp, request.n):
                if first:  # queueing + prefill end with the first token
                    phase.end()
                    phase = tracing.start_span(tracing.SPAN_DECODE, parent=root)
                    first = False
                if event.usage is not None:  # the last event of a choice
                    completion += event.usage.completion_tokens
                    root.set_attribute(tracing.ATTR_PROMPT_TOKENS, event.usage.prompt_tokens)
                    root.set_attribute(tracing.ATTR_COMPLETION_TOKENS, completion)
                    reason = event.finish_reason.value if event.finish_reason is not None else ""
                    root.set_attribute(tracing.ATTR_FINISH_REASON, reason)
                if event.logprobs:
                    event.logprobs = [self._named(lp) for lp in event.logprobs]
                yield event
        except BaseException as exc:
            tracing.record_error(root, exc)
            raise
        finally:
            phase.end()
            root.end()

    def count_tokens(
        self, messages: list[ChatMessage], image_tiles: list[int], ctx: RequestContext
    ) -> tuple[int, int]:
        self.signer.verify(ctx)
        check_messages(messages)
        check_image_tiles(image_tiles, entry_frames(messages))
        return self.core.count_tokens(template_messages(messages), image_tiles)

    async def _input(
        self, request: DecodeRequest, refs: list[EmbeddingRef], ctx: RequestContext
    ) -> GenerateInput:
        tensors = await self.resolver.resolve_all(refs, ctx.cache_namespace)
        images = [ImageEmbedding(t.to_torch(), ref.tiles, _identity(ref, t)) for t, ref in zip(tensors, refs)]
        return GenerateInput(
            # A caller without an id still gets a unique one: the engine refuses an id in use.
            request_id=ctx.request_id or f"decode-{uuid.uuid4().hex[:24]}",
            messages=template_messages(request.messages),
            images=images,
            sampling=request.sampling,
            max_tokens=request.max_tokens,
            cache_namespace=ctx.cache_namespace,
            priority=ctx.priority,
            tenant=ctx.tenant,
            weight=ctx.weight,
            max_kv_share=ctx.max_kv_share,
            deadline=ctx.deadline,
            deadline_is_epoch=ctx.deadline is not None,
        )

    def _named(self, lp: TokenLogprob) -> TokenLogprob:
        """The log-probability with the token strings (and their UTF-8 bytes) of the chosen token and
        of each alternative."""
        token, token_bytes = self._token(lp.token_id)
        return replace(lp, token=token, token_bytes=token_bytes, top=[self._named_top(t) for t in lp.top])

    def _named_top(self, top: TopLogprob) -> TopLogprob:
        token, token_bytes = self._token(top.token_id)
        return replace(top, token=token, token_bytes=token_bytes)

    def _token(self, token_id: int) -> tuple[str, bytes]:
        text = self.core.tokenizer.decode([token_id])
        return text, text.encode("utf-8", "replace")


def _identity(ref: EmbeddingRef, tensor: Any) -> str:
    """What names an image in the KV prefix cache (the engine adds the namespace): the key the encoder
    made for a cache or object reference (checked against the namespace when resolved), the hash of the
    bytes for an inline tensor, so no caller can file a tensor of its own under another image's name."""
    if ref.kind == KIND_INLINE:
        digest = hashlib.sha256(tensor.data).hexdigest()
        return f"inline:{tensor.dtype}:{'x'.join(map(str, tensor.shape))}:{digest}"
    return ref.key


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, frontend: DecoderFrontend):
        self.frontend = frontend

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        decode = decode_request_from_pb(request)
        refs = [ref_from_pb(r) for r in request.images]
        async for event in self.frontend.generate(decode, refs, context_from_pb(request.context)):
            yield event_to_pb(event)

    async def CountTokens(self, request, context):  # noqa: N802 - gRPC method name
        messages = messages_from_pb(request.messages, len(request.image_tiles))
        total, image = self.frontend.count_tokens(
            messages, list(request.image_tiles), context_from_pb(request.context)
        )
        return decoder_pb2.CountTokensResponse(total_tokens=total, image_tokens=image)

    def registration(self):
        return (decoder_pb2_grpc.add_DecoderServiceServicer_to_server, self, SERVICE_NAME)
