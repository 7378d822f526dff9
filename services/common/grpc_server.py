"""One way to run a gRPC server and open a channel, shared by every service.

- Message-size bounds are explicit on every server and client (gRPC's 4 MiB default is too small for a
  40-tile image: 41 tiles of uint8 448x448x3 are 24.7 MB). ``MAX_MESSAGE_BYTES`` is the bound unless the
  caller passes another; anything larger is refused by gRPC itself with RESOURCE_EXHAUSTED.
- The standard ``grpc.health.v1.Health`` service and server reflection are always on, so
  ``grpc_health_probe``, Kubernetes gRPC probes and ``buf curl`` work without Ray-specific metadata.
- One interceptor maps ``MeshError`` subclasses to status codes with a reason the caller can act on;
  anything else becomes INTERNAL with the request id, never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import MeshError, ResourceExhausted

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def status_code(error: MeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def trailing_metadata(error: MeshError) -> tuple[tuple[str, str], ...]:
    md = [("x-error-reason", error.reason)]
    if isinstance(error, ResourceExhausted) and error.retry_after is not None:
        md.append(("retry-after", f"{max(error.retry_after, 0):.3f}"))
    return tuple(md)


async def abort_with(context: grpc.aio.ServicerContext, error: MeshError) -> None:
    context.set_trailing_metadata(trailing_metadata(error))
    await context.abort(status_code(error), error.message)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors raised by a servicer to gRPC status codes (unary and streaming)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler  # health and reflection: grpc's own (synchronous) handlers
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                try:
                    return await inner(request, context)
                except MeshError as exc:
                    await abort_with(context, exc)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except MeshError as exc:
                    await abort_with(context, exc)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, deserialize, handler.response_serializer
            )
        return handler


class _Undecodable:
    """Stands in for a request whose bytes do not parse, so the handler can answer INVALID_ARGUMENT
    (grpc.aio would otherwise answer UNKNOWN from inside its own deserializer)."""

    def __init__(self, message: str):
        self.message = message


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(f"request is not a valid message: {exc}")

    return deserialize


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError from context.abort(); it must propagate untouched.
    return type(exc).__name__ in {"AbortError", "BaseError"} or isinstance(exc, grpc.aio.AioRpcError)


@dataclass
class GrpcServer:
    """A started grpc.aio server with health and reflection."""

    server: grpc.aio.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def stop(self, grace: float | None = 5.0) -> None:
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)

    def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            self.health.set(name, status)


async def start_server(
    registrations: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    serving: bool = True,
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Start a server for ``(add_XServicer_to_server, servicer, full_service_name)`` triples.

    ``port=0`` picks a free port (returned). ``credentials`` serves TLS instead of plaintext. Health reports SERVING for every service once started
    (pass ``serving=False`` to flip it later, after warm-up).
    """
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(), *interceptors], options=server_options(max_message_bytes)
    )
    names = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    result = GrpcServer(server, bound, health_servicer, names)
    result.set_serving(serving)
    return result


async def via_serve_proxy(call: Awaitable[Any], grpc_context: Any, empty: Callable[[], Any]) -> Any:
    """A servicer call made by Serve's gRPC proxy (``grpc_context`` is Serve's, None over a handle): a
    domain error becomes its status code, reason and message, as ``ErrorInterceptor`` gives a server of
    our own, instead of INTERNAL with the replica's traceback."""
    try:
        return await call
    except MeshError as exc:
        if grpc_context is None:
            raise
        _set_status(grpc_context, exc)
        return empty()


async def stream_via_serve_proxy(stream: AsyncIterator[Any], grpc_context: Any) -> AsyncIterator[Any]:
    """:func:`via_serve_proxy` for a server-streaming call."""
    try:
        async for item in stream:
            yield item
    except MeshError as exc:
        if grpc_context is None:
            raise
        _set_status(grpc_context, exc)


def _set_status(grpc_context: Any, error: MeshError) -> None:
    grpc_context.set_code(status_code(error))
    grpc_context.set_details(error.message)
    grpc_context.set_trailing_metadata(trailing_metadata(error))


def open_channel(target: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
