"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions``, ``GET /v1/models``, health.

These are the only routes of the public HTTP port; metrics have their own listener
(``gateway.metrics.MetricsListener``).

Errors use OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with the status of the
domain error. A streamed response starts only after the request has been admitted and its first chunk
exists, so authentication, limits and bad input are HTTP statuses, never a broken stream. A client
that disconnects cancels the generation downstream (the generator chain is closed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway.core import Gateway
from gateway.intake import api_key, trace_context
from gateway.openai_schema import ChatCompletionRequest, error_body
from gateway.tenancy.config import SCOPE_CHAT
from gateway.tenancy.keys import Principal
from gateway.types import ChatChunk, Usage
from services.common.errors import MeshError, ResourceExhausted
from services.decoder.types import FinishReason

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 * 1024 * 1024


def _error_response(exc: MeshError) -> JSONResponse:
    headers = {}
    if isinstance(exc, ResourceExhausted) and exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(
        error_body(exc.message, exc.http_status, exc.reason), status_code=exc.http_status, headers=headers
    )


def create_http_app(gateway: Gateway, *, ready: Callable[[], bool] = lambda: True) -> FastAPI:
    app = FastAPI(title="InternVL Mesh", docs_url=None, redoc_url=None, openapi_url=None, **_no_telemetry())

    @app.exception_handler(MeshError)
    async def _mesh_error(_: Request, exc: MeshError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        return JSONResponse(error_body(_describe(first), 400, "invalid_request"), status_code=400)

    _add_probes(app, ready)

    @app.get("/v1/models")
    async def models(request: Request):
        routes = await gateway.list_models(api_key(request.headers.items()))
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": r.name, "object": "model", "created": now, "owned_by": "internvl-mesh"} for r in routes
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # Who asks before what they sent: an unauthenticated body is never read.
        principal = await gateway.authenticate(api_key(request.headers.items()), SCOPE_CHAT)
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            return body
        parsed = _parse_chat(body)
        if isinstance(parsed, JSONResponse):
            return parsed
        principal.tenant.check_request_size(images=parsed.image_count())  # before any is decoded
        return await _chat(gateway, parsed, request.headers.items(), principal)

    return app


def _no_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry spans, metrics and logs off (where this FastAPI has them): its spans
    would take the caller's ``traceparent`` as their parent (sampling forced by the caller) and its logs
    quote exception messages. The gateway's spans are the mesh's own (``services.common.tracing``)."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


def _add_probes(app: FastAPI, ready: Callable[[], bool]) -> None:
    """Liveness and readiness."""

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def readiness():
        if not ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready"}


def _too_large() -> JSONResponse:
    return JSONResponse(error_body(f"request body over {MAX_BODY_BYTES} bytes", 413, "body_too_large"), 413)


async def _read_body(request: Request) -> bytes | JSONResponse:
    """The body, read only up to ``MAX_BODY_BYTES``: a larger ``Content-Length`` is refused before a
    byte is read, a longer stream as soon as it passes the bound."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return JSONResponse(error_body("Content-Length is not a number", 400, "invalid_request"), 400)
        if int(declared) > MAX_BODY_BYTES:
            return _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_chat(body: bytes) -> ChatCompletionRequest | JSONResponse:
    """The request body as a ``ChatCompletionRequest``, or the 4xx answer that says what is wrong."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return JSONResponse(error_body(f"request body is not valid JSON: {exc}", 400, "invalid_json"), 400)
    if not isinstance(raw, dict):
        return JSONResponse(error_body("request body must be a JSON object", 400, "invalid_json"), 400)
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        return JSONResponse(error_body(_describe(first), 400, "invalid_request", _param(first)), 400)


async def _chat(gateway: Gateway, parsed: ChatCompletionRequest, headers, principal: Principal) -> Response:
    """Run one chat completion: a stream of server-sent events, or one JSON answer."""
    route = gateway.routes.get(parsed.model)
    req = parsed.to_domain(route.max_tiles_per_image if route else 12, gateway.fetcher is not None)
    req.trace = trace_context(headers)
    stream = gateway.chat(req, principal)
    first = await anext(stream, None)  # errors before the first chunk are HTTP statuses
    created = int(time.time())
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(
            _sse(first, stream, parsed.model, created, include_usage, parsed.logprobs),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": req.request_id},
        )
    return JSONResponse(
        await _collect(first, stream, parsed.model, created, parsed.logprobs),
        headers={"x-request-id": req.request_id},
    )


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


def _param(err: dict[str, Any]) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or None


def _usage(u: Usage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens, "image_tokens": u.image_tokens},
    }


def _logprobs(chunk: ChatChunk) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": lp.bytes,
            "top_logprobs": [{"token": t, "logprob": p, "bytes": b} for t, p, b in lp.top],
        }
        for lp in chunk.logprobs
    ]


async def _collect(first, stream: AsyncIterator[ChatChunk], model: str, created: int, logprobs: bool | None):
    choices: dict[int, dict[str, Any]] = {}  # index -> its text, log-probabilities and finish reason
    chunk, usage = first, None
    try:
        while chunk is not None:
            choice = choices.setdefault(chunk.index, {"text": [], "logprobs": [], "finish": None})
            choice["text"].append(chunk.text)
            choice["logprobs"].extend(_logprobs(chunk))
            choice["finish"] = chunk.finish_reason or choice["finish"]
            usage = chunk.usage or usage
            chunk = await anext(stream, None)
    finally:
        await stream.aclose()
    request_id = first.request_id if first else ""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(c["text"])},
                "finish_reason": _finish(c["finish"]),
                "logprobs": {"content": c["logprobs"]} if logprobs else None,
            }
            for index, c in sorted(choices.items())
        ],
        "usage": _usage(usage),
    }


# Characters that some line readers end a line at (Python's str.splitlines, httpx's aiter_lines), though
# SSE ends lines at CR and LF only: escaped, so an event is one line for every client. They occur in
# the JSON text only inside strings, where the escape means the same character.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def sse_json(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


def _finish(reason: FinishReason | None) -> str:
    return (reason or FinishReason.STOP).value  # the domain spelling is the wire spelling


async def _sse(first, stream, model: str, created: int, include_usage: bool, logprobs: bool | None):
    request_id = first.request_id if first else ""

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {sse_json(payload)}\n\n"

    chunk, usage, started = first, None, set()
    try:
        while chunk is not None:
            index = chunk.index
            if index not in started:  # a choice's first chunk names the role
                started.add(index)
                yield event(
                    [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                )
            if chunk.text or chunk.logprobs:
                choice = {"index": index, "delta": {"content": chunk.text}, "finish_reason": None}
                if logprobs:
                    choice["logprobs"] = {"content": _logprobs(chunk)}
                yield event([choice])
            if chunk.finish_reason is not None:
                yield event([{"index": index, "delta": {}, "finish_reason": _finish(chunk.finish_reason)}])
            usage = chunk.usage or usage
            chunk = await anext(stream, None)
    except MeshError as exc:  # after the stream started: an error event, then the end
        yield f"data: {json.dumps(error_body(exc.message, exc.http_status, exc.reason))}\n\n"
    finally:
        # A disconnected client closes this generator: close the chain so the decoder stops too.
        await stream.aclose()
    if include_usage:
        yield event([], _usage(usage))
    yield "data: [DONE]\n\n"
