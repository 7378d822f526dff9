"""The public gRPC API (``internvl.gateway.v1.GatewayService``): the same request path as HTTP.

Authenticate with ``authorization: Bearer <key>`` (or ``x-api-key``) metadata, as over HTTP. Served by
each gateway replica's own grpc.aio server, with standard health and reflection, so no Ray-specific
metadata is needed.
"""

from __future__ import annotations

from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.core import Gateway
from gateway.images import checked_image, decode_data_uri, is_remote
from gateway.intake import api_key, response_format, trace_context
from gateway.tenancy.config import SCOPE_CHAT
from gateway.types import ChatChunk, ChatRequest, ImagePart, Message, TextPart, Usage, VideoPart
from gateway.videos import checked_video, decode_video_data_uri, video_part
from services.common.errors import InvalidArgument

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def chat_from_pb(request: gateway_pb2.ChatRequest, allow_remote: bool = False) -> ChatRequest:
    """The wire format only; the rules of the conversation are checked for both APIs by the gateway."""
    messages = []
    for k, m in enumerate(request.messages):
        parts: list[TextPart | ImagePart | VideoPart] = []
        for part in m.content:
            which = part.WhichOneof("part")
            if which == "text":
                parts.append(TextPart(part.text))
            elif which == "image":
                parts.append(_image_from_pb(part.image, k, allow_remote))
            elif which == "video":
                parts.append(_video_from_pb(part.video, k, allow_remote))
            else:
                raise InvalidArgument(f"messages[{k}]: an empty content part")
        messages.append(Message(m.role, parts))
    return ChatRequest(
        model=request.model,
        messages=messages,
        max_tokens=request.max_tokens or None,
        temperature=request.temperature,
        top_p=request.top_p or 1.0,
        top_k=request.top_k,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=request.repetition_penalty or 1.0,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        timeout_s=_timeout_s(request.timeout_ms),
        response_format=_response_format_from_pb(request),
        logit_bias=dict(request.logit_bias),
        n=request.n or 1,  # 0: unset
    )


_FORMAT_TYPES = {
    gateway_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
    gateway_pb2.RESPONSE_FORMAT_TYPE_TEXT: "text",
    gateway_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    gateway_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}


def _response_format_from_pb(request: gateway_pb2.ChatRequest):
    if not request.HasField("response_format"):
        return None
    fmt = request.response_format
    kind = _FORMAT_TYPES.get(fmt.type, f"type {fmt.type}")
    if not fmt.HasField("json_schema"):
        return response_format(kind)
    return response_format(kind, fmt.json_schema.name, fmt.json_schema.schema)


def count_images(request: gateway_pb2.ChatRequest) -> int:
    return sum(1 for m in request.messages for p in m.content if p.WhichOneof("part") in ("image", "video"))


def _image_from_pb(img: gateway_pb2.Image, k: int, allow_remote: bool) -> ImagePart:
    source = img.WhichOneof("source")
    if source == "data":
        return ImagePart(checked_image(img.data), img.max_num or None)
    if source == "url" and allow_remote and is_remote(img.url):
        return ImagePart(b"", img.max_num or None, img.url)
    if source == "url":
        return ImagePart(decode_data_uri(img.url), img.max_num or None)
    raise InvalidArgument(f"messages[{k}]: an image part has neither data nor url")


def _video_from_pb(video: gateway_pb2.Video, k: int, allow_remote: bool) -> VideoPart:
    source = video.WhichOneof("source")
    if source == "data":
        data, url = checked_video(video.data), None
    elif source == "url" and allow_remote and is_remote(video.url):
        data, url = b"", video.url
    elif source == "url":
        data, url = decode_video_data_uri(video.url), None
    else:
        raise InvalidArgument(f"messages[{k}]: a video part has neither data nor url")
    bound = (video.bound.start_s, video.bound.end_s) if video.HasField("bound") else None
    return video_part(data, url, video.num_frames or None, bound, video.max_num or None)


def _timeout_s(timeout_ms: int) -> float | None:
    if timeout_ms < 0:
        raise InvalidArgument(f"timeout_ms must be positive (0: the default), got {timeout_ms}")
    return timeout_ms / 1000 if timeout_ms else None


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def Chat(self, request, context):  # noqa: N802 - gRPC method name
        metadata = context.invocation_metadata() or ()
        principal = await self.gateway.authenticate(api_key(metadata), SCOPE_CHAT)
        # Images are counted before any is decoded.
        principal.tenant.check_request_size(images=count_images(request))
        req = chat_from_pb(request, self.gateway.fetcher is not None)
        req.trace = trace_context(metadata)
        async for chunk in self.gateway.chat(req, principal):
            yield chunk_to_pb(chunk)

    async def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        routes = await self.gateway.list_models(api_key(context.invocation_metadata() or ()))
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.Model(
                    id=r.name,
                    owned_by="internvl-mesh",
                    max_tiles_per_image=r.max_tiles_per_image,
                    max_model_len=r.max_model_len,
                )
                for r in routes
            ]
        )

    def registration(self):
        return (gateway_pb2_grpc.add_GatewayServiceServicer_to_server, self, SERVICE_NAME)


def chunk_to_pb(chunk: ChatChunk) -> gateway_pb2.ChatResponse:
    pb = gateway_pb2.ChatResponse(
        id=chunk.request_id,
        text=chunk.text,
        logprobs=[
            gateway_pb2.TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                token_bytes=bytes(lp.bytes),
                top_logprobs=[
                    gateway_pb2.TopLogprob(token=t, logprob=p, token_bytes=bytes(b)) for t, p, b in lp.top
                ],
            )
            for lp in chunk.logprobs
        ],
        finish_reason=chunk.finish_reason.value if chunk.finish_reason else "",  # "" until the choice's last
        index=chunk.index,
    )
    if chunk.usage is not None:
        pb.usage.CopyFrom(_usage_to_pb(chunk.usage))
    return pb


def _usage_to_pb(u: Usage) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        image_tokens=u.image_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_images=u.cached_images,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )
