"""The public gRPC API (``internvl.gateway.v1.GatewayService``): the same request path as HTTP.

Authenticate with ``authorization: Bearer <key>`` metadata. Served by each gateway replica's own
grpc.aio server, with standard health and reflection, so no Ray-specific metadata is needed.
"""

from __future__ import annotations

from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.core import Gateway
from gateway.images import decode_data_uri, is_remote
from gateway.types import ChatRequest, ImagePart, Message, TextPart
from services.common.errors import InvalidArgument

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def _api_key(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip() or None
        if key == "x-api-key":
            return value or None
    return None


def chat_from_pb(
    request: gateway_pb2.ChatRequest, max_image_bytes: int, allow_remote: bool = False
) -> ChatRequest:
    messages = []
    for k, m in enumerate(request.messages):
        if m.role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"messages[{k}].role must be system, user or assistant, got {m.role!r}")
        parts = []
        for part in m.content:
            which = part.WhichOneof("part")
            if which == "text":
                parts.append(TextPart(part.text))
            elif which == "image":
                img = part.image
                source = img.WhichOneof("source")
                if source == "data":
                    if len(img.data) > max_image_bytes:
                        raise InvalidArgument(
                            f"image over the {max_image_bytes}-byte limit", reason="image_too_large"
                        )
                    data = img.data
                elif source == "url" and allow_remote and is_remote(img.url):
                    parts.append(ImagePart(b"", img.max_num or None, img.url))
                    continue
                elif source == "url":
                    data = decode_data_uri(img.url, max_image_bytes)
                else:
                    raise InvalidArgument(f"messages[{k}]: an image part has neither data nor url")
                parts.append(ImagePart(data, img.max_num or None))
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
    )


def _timeout_s(timeout_ms: int) -> float | None:
    if timeout_ms < 0:
        raise InvalidArgument(f"timeout_ms must be positive (0: the default), got {timeout_ms}")
    return timeout_ms / 1000 if timeout_ms else None


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def Chat(self, request, context):  # noqa: N802 - gRPC method name
        req = chat_from_pb(request, self.gateway.limits.max_image_bytes, self.gateway.fetcher is not None)
        req.trace = {
            k: v for k, v in (context.invocation_metadata() or ()) if k in ("traceparent", "tracestate")
        }
        async for chunk in self.gateway.chat(req, _api_key(context)):
            pb = gateway_pb2.ChatResponse(
                id=chunk.request_id,
                text=chunk.text,
                logprobs=[
                    gateway_pb2.TokenLogprob(token=lp.token, logprob=lp.logprob) for lp in chunk.logprobs
                ],
                finish_reason=chunk.finish_reason or "",
            )
            if chunk.usage is not None:
                u = chunk.usage
                pb.usage.CopyFrom(
                    gateway_pb2.Usage(
                        prompt_tokens=u.prompt_tokens,
                        image_tokens=u.image_tokens,
                        completion_tokens=u.completion_tokens,
                        total_tokens=u.total_tokens,
                        cached_images=u.cached_images,
                    )
                )
            yield pb

    async def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        routes = await self.gateway.list_models(_api_key(context))
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
