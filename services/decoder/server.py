"""The decoder's service boundary: references in, streamed events out.

``DecoderFrontend`` turns a request (chat messages, embedding references, sampling values, the request
context) into the engine's ``GenerateInput`` — resolving every reference, whatever its kind — and each
``GenerationEvent`` into a plain dict (token strings for logprobs included) that travels over Ray
handles unchanged. ``DecoderServicer`` is the gRPC face of the same thing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from internvl.decoder.v1 import decoder_pb2, decoder_pb2_grpc

from services.common import tracing
from services.common.errors import InvalidArgument
from services.common.pb import RequestContext, context_from_pb, ref_from_pb
from services.common.refs import EmbeddingRef
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput, GenerationEvent, ImageEmbedding
from services.embedding_cache.resolver import EmbeddingResolver

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name
_FINISH = {
    "stop": decoder_pb2.FINISH_REASON_STOP,
    "length": decoder_pb2.FINISH_REASON_LENGTH,
    "cancelled": decoder_pb2.FINISH_REASON_CANCELLED,
    "deadline": decoder_pb2.FINISH_REASON_DEADLINE,
    "error": decoder_pb2.FINISH_REASON_ERROR,
}


class DecoderFrontend:
    def __init__(self, core: Any, resolver: EmbeddingResolver):
        self.core = core
        self.resolver = resolver

    async def generate(
        self, payload: dict[str, Any], refs: list[EmbeddingRef], ctx: RequestContext
    ) -> AsyncIterator[dict[str, Any]]:
        root = tracing.start_span(
            tracing.SPAN_DECODER,
            carrier=ctx.trace or None,
            server=True,
            attributes={tracing.ATTR_REQUEST_ID: ctx.request_id, tracing.ATTR_IMAGES: len(refs)},
        )
        phase = tracing.start_span(tracing.SPAN_PREFILL, parent=root)
        first = True
        try:
            inp = await self._input(payload, refs, ctx)
            async for event in self.core.generate(inp):
                if first:  # queueing + prefill end with the first token
                    phase.end()
                    phase = tracing.start_span(tracing.SPAN_DECODE, parent=root)
                    first = False
                if event.usage is not None:
                    root.set_attribute(tracing.ATTR_PROMPT_TOKENS, event.usage.prompt_tokens)
                    root.set_attribute(tracing.ATTR_COMPLETION_TOKENS, event.usage.completion_tokens)
                    root.set_attribute(tracing.ATTR_FINISH_REASON, event.finish_reason or "")
                yield self._event(event)
        except BaseException as exc:
            tracing.record_error(root, exc)
            raise
        finally:
            phase.end()
            root.end()

    def count_tokens(self, messages: list[dict[str, Any]], image_tiles: list[int]) -> tuple[int, int]:
        return self.core.count_tokens(messages, image_tiles)

    async def _input(
        self, payload: dict[str, Any], refs: list[EmbeddingRef], ctx: RequestContext
    ) -> GenerateInput:
        tensors = await self.resolver.resolve_all(refs)
        images = [
            ImageEmbedding(t.to_torch(), ref.tiles, ref.key or f"{ref.image_sha256}:{ref.tiles}")
            for t, ref in zip(tensors, refs)
        ]
        sampling = dict(payload.get("sampling") or {})
        try:
            params = SamplingParams(**sampling)
        except TypeError as exc:
            raise InvalidArgument(f"unknown sampling parameter: {exc}") from None
        return GenerateInput(
            request_id=ctx.request_id or payload.get("request_id", ""),
            messages=payload["messages"],
            images=images,
            sampling=params,
            max_tokens=payload.get("max_tokens"),
            cache_namespace=ctx.cache_namespace,
            priority=ctx.priority,
            deadline=ctx.deadline,
            deadline_is_epoch=ctx.deadline is not None,
        )

    def _event(self, event: GenerationEvent) -> dict[str, Any]:
        out: dict[str, Any] = {"text": event.text, "token_ids": list(event.token_ids)}
        if event.logprobs:
            out["logprobs"] = [
                {
                    "token_id": lp.token_id,
                    **self._token(lp.token_id),
                    "logprob": lp.logprob,
                    "top": [(self._token(t)["token"], p, self._token(t)["bytes"]) for t, p in lp.top],
                }
                for lp in event.logprobs
            ]
        if event.finish_reason is not None:
            out["finish_reason"] = event.finish_reason
            if event.usage is not None:
                out["usage"] = {
                    "prompt_tokens": event.usage.prompt_tokens,
                    "image_tokens": event.usage.image_tokens,
                    "completion_tokens": event.usage.completion_tokens,
                    "cached_prompt_tokens": event.usage.cached_prompt_tokens,
                }
        if event.prompt_tokens is not None:
            out["prompt_tokens"] = event.prompt_tokens
            out["image_tokens"] = event.image_tokens or 0
        if event.error:
            out["error"] = event.error
        return out

    def _token(self, token_id: int) -> dict[str, Any]:
        text = self.core.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode("utf-8", "replace"))}


def _messages_from_pb(messages, n_images: int) -> list[dict[str, Any]]:
    out, seen = [], 0
    for m in messages:
        parts = []
        for part in m.content:
            which = part.WhichOneof("part")
            if which == "text":
                parts.append({"type": "text", "text": part.text})
            elif which == "image_index":
                if part.image_index != seen:
                    raise InvalidArgument("image parts must reference images 0, 1, 2, ... in order")
                seen += 1
                parts.append({"type": "image"})
        out.append({"role": m.role, "content": parts})
    if seen != n_images:
        raise InvalidArgument(f"{seen} image parts but {n_images} embedding references")
    return out


def _sampling_from_pb(s) -> dict[str, Any]:
    return {
        "temperature": s.temperature,
        "top_p": s.top_p or 1.0,
        "top_k": s.top_k,
        "repetition_penalty": s.repetition_penalty or 1.0,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "seed": s.seed if s.HasField("seed") else None,
        "stop": list(s.stop),
        "stop_token_ids": list(s.stop_token_ids),
        "logprobs": s.top_logprobs if s.logprobs else None,
    }


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, frontend: DecoderFrontend):
        self.frontend = frontend

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        refs = [ref_from_pb(r) for r in request.images]
        payload = {
            "messages": _messages_from_pb(request.messages, len(refs)),
            "sampling": _sampling_from_pb(request.sampling),
            "max_tokens": request.sampling.max_tokens or None,
        }
        async for event in self.frontend.generate(payload, refs, context_from_pb(request.context)):
            yield _event_to_pb(event)

    async def CountTokens(self, request, context):  # noqa: N802 - gRPC method name
        messages = _messages_from_pb(request.messages, len(request.image_tiles))
        total, image = self.frontend.count_tokens(messages, list(request.image_tiles))
        return decoder_pb2.CountTokensResponse(total_tokens=total, image_tokens=image)

    def registration(self):
        return (decoder_pb2_grpc.add_DecoderServiceServicer_to_server, self, SERVICE_NAME)


def _event_to_pb(event: dict[str, Any]) -> decoder_pb2.GenerateResponse:
    pb = decoder_pb2.GenerateResponse(text=event["text"], token_ids=event["token_ids"])
    for lp in event.get("logprobs") or []:
        pb.logprobs.add(
            token_id=lp["token_id"],
            token=lp["token"],
            logprob=lp["logprob"],
            top=[decoder_pb2.TopLogprob(token=t, logprob=p) for t, p, _ in lp["top"]],
        )
    if "finish_reason" in event:
        pb.finish_reason = _FINISH[event["finish_reason"]]
        u = event.get("usage") or {}
        pb.usage.CopyFrom(
            decoder_pb2.Usage(
                prompt_tokens=u.get("prompt_tokens", 0),
                image_tokens=u.get("image_tokens", 0),
                completion_tokens=u.get("completion_tokens", 0),
                cached_prompt_tokens=u.get("cached_prompt_tokens", 0),
            )
        )
    if event.get("error"):
        pb.error_message = event["error"]
    return pb
