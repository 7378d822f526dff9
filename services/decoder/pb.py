"""Conversions between the decoder's protobuf messages and its domain types (``services.decoder.types``).

The servicer calls the ``from_pb`` side on what it receives and ``event_to_pb`` on what it sends; a
gRPC client of the decoder calls the other two. Each pair round-trips: an object that goes through
``to_pb`` and back is equal to itself (floats are ``float`` on the wire: a value that a float32 holds
exactly, as the engine's log-probabilities are, survives unchanged).
"""

from __future__ import annotations

from internvl.decoder.v1 import decoder_pb2

from services.common.errors import InvalidArgument
from services.decoder.engine.response_format import (
    KIND_JSON_OBJECT,
    KIND_JSON_SCHEMA,
    REASON_INVALID,
    ResponseFormat,
)
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    FinishReason,
    GenerationEvent,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
    TokenLogprob,
    TopLogprob,
    Usage,
)

# The wire enum is named after the domain one: a member without its wire value fails at import.
_FINISH_TO_PB = {r: decoder_pb2.FinishReason.Value(f"FINISH_REASON_{r.name}") for r in FinishReason}
_FINISH_FROM_PB = {v: r for r, v in _FINISH_TO_PB.items()}
_FORMAT_TO_PB = {
    KIND_JSON_OBJECT: decoder_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    KIND_JSON_SCHEMA: decoder_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}


# -- the request ------------------------------------------------------------------------------------
def messages_from_pb(messages, num_images: int) -> list[ChatMessage]:
    """Messages whose image parts name images ``0, 1, 2, ...`` in order, ``num_images`` of them."""
    out, seen = [], 0
    for m in messages:
        content: list[TextContent | ImagePlaceholder] = []
        for part in m.content:
            which = part.WhichOneof("part")
            if which == "text":
                content.append(TextContent(part.text))
            elif which == "image_index":
                if part.image_index != seen:
                    raise InvalidArgument("image parts must reference images 0, 1, 2, ... in order")
                seen += 1
                content.append(ImagePlaceholder())
        out.append(ChatMessage(m.role, content))
    if seen != num_images:
        raise InvalidArgument(f"{seen} image parts but {num_images} embedding references")
    return out


def messages_to_pb(messages: list[ChatMessage]) -> list[decoder_pb2.Message]:
    out, seen = [], 0
    for m in messages:
        pb = decoder_pb2.Message(role=m.role)
        for part in m.content:
            if isinstance(part, TextContent):
                pb.content.add(text=part.text)
            else:
                pb.content.add(image_index=seen)
                seen += 1
        out.append(pb)
    return out


def response_format_from_pb(f: decoder_pb2.ResponseFormat) -> ResponseFormat | None:
    """None for free text; the schema in its canonical form (InvalidArgument if it is not JSON)."""
    if f.type == decoder_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED:
        return None
    kind = _FORMAT_FROM_PB.get(f.type)
    if kind is None:
        raise InvalidArgument(f"response_format.type {f.type} is not a known type", reason=REASON_INVALID)
    if kind == KIND_JSON_SCHEMA:
        if not f.schema:
            raise InvalidArgument("response_format: json_schema needs a schema", reason=REASON_INVALID)
        return ResponseFormat(kind, ResponseFormat.json_schema(f.schema).schema, f.max_compile_ms)
    return ResponseFormat(kind, f.schema, f.max_compile_ms)


def response_format_to_pb(fmt: ResponseFormat) -> decoder_pb2.ResponseFormat:
    return decoder_pb2.ResponseFormat(
        type=_FORMAT_TO_PB[fmt.kind], schema=fmt.schema, max_compile_ms=fmt.max_compile_ms
    )


def sampling_from_pb(s: decoder_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty or 1.0,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.top_logprobs if s.logprobs else None,
        skip_special_tokens=s.skip_special_tokens if s.HasField("skip_special_tokens") else True,
        response_format=response_format_from_pb(s.response_format),
        logit_bias=dict(s.logit_bias),
    )


def sampling_to_pb(p: SamplingParams, max_tokens: int | None) -> decoder_pb2.SamplingParams:
    pb = decoder_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=p.seed,
        max_tokens=max_tokens or 0,
        stop=p.stop,
        stop_token_ids=p.stop_token_ids,
        logprobs=p.logprobs is not None,
        top_logprobs=p.logprobs or 0,
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        logit_bias=p.logit_bias,
    )
    if p.response_format is not None:
        pb.response_format.CopyFrom(response_format_to_pb(p.response_format))
    return pb


def decode_request_from_pb(pb: decoder_pb2.GenerateRequest) -> DecodeRequest:
    """The request without its references (``ref_from_pb`` each of ``pb.images``) and context."""
    return DecodeRequest(
        messages=messages_from_pb(pb.messages, len(pb.images)),
        sampling=sampling_from_pb(pb.sampling),
        max_tokens=pb.sampling.max_tokens or None,
        n=pb.n or 1,
    )


def decode_request_to_pb(request: DecodeRequest) -> decoder_pb2.GenerateRequest:
    """The request without its references and context (the caller adds ``images`` and ``context``)."""
    return decoder_pb2.GenerateRequest(
        messages=messages_to_pb(request.messages),
        sampling=sampling_to_pb(request.sampling, request.max_tokens),
        n=request.n,
    )


# -- the events -------------------------------------------------------------------------------------
def event_to_pb(event: GenerationEvent) -> decoder_pb2.GenerateResponse:
    pb = decoder_pb2.GenerateResponse(
        request_id=event.request_id,
        text=event.text,
        token_ids=event.token_ids,
        logprobs=[
            decoder_pb2.TokenLogprob(
                token_id=lp.token_id,
                token=lp.token,
                token_bytes=lp.token_bytes,
                logprob=lp.logprob,
                top=[
                    decoder_pb2.TopLogprob(
                        token_id=t.token_id, token=t.token, token_bytes=t.token_bytes, logprob=t.logprob
                    )
                    for t in lp.top
                ],
            )
            for lp in event.logprobs or ()
        ],
        error_message=event.error or "",
        prompt_tokens=event.prompt_tokens,
        image_tokens=event.image_tokens,
        index=event.index,
    )
    if event.finish_reason is not None:
        pb.finish_reason = _FINISH_TO_PB[event.finish_reason]
    if event.usage is not None:
        u = event.usage
        pb.usage.CopyFrom(
            decoder_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                image_tokens=u.image_tokens,
                completion_tokens=u.completion_tokens,
                cached_prompt_tokens=u.cached_prompt_tokens,
            )
        )
    return pb


def event_from_pb(pb: decoder_pb2.GenerateResponse) -> GenerationEvent:
    usage = pb.usage if pb.HasField("usage") else None
    return GenerationEvent(
        request_id=pb.request_id,
        text=pb.text,
        token_ids=list(pb.token_ids),
        logprobs=[
            TokenLogprob(
                lp.token_id,
                lp.logprob,
                [TopLogprob(t.token_id, t.logprob, t.token, t.token_bytes) for t in lp.top],
                lp.token,
                lp.token_bytes,
            )
            for lp in pb.logprobs
        ]
        or None,
        finish_reason=_FINISH_FROM_PB.get(pb.finish_reason),
        usage=Usage(
            usage.prompt_tokens, usage.image_tokens, usage.completion_tokens, usage.cached_prompt_tokens
        )
        if usage is not None
        else None,
        error=pb.error_message or None,
        prompt_tokens=pb.prompt_tokens if pb.HasField("prompt_tokens") else None,
        image_tokens=pb.image_tokens if pb.HasField("image_tokens") else None,
        index=pb.index,
    )
