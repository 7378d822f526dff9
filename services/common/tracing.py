"""OpenTelemetry: one trace per request across gateway, encoder, preprocess and decoder.

``setup_tracing`` runs once per process at its entry point (a Serve replica's constructor, the CLI).
Spans cross process boundaries in W3C trace context: as gRPC metadata on gRPC hops, and as the
``RequestContext.trace`` carrier on Ray DeploymentHandle hops (which carry no metadata). Span and
attribute names live here, in one place.

A caller outside the mesh does not decide anything about the mesh's traces: the gateway starts every
request's trace as a new root (sampled by the mesh's own ``sampling_ratio``) and records the caller's
trace context, if it sent one, as a *link* of that root span, so a caller cannot force sampling (and the
cost of exporting) nor graft the mesh's spans into a trace of its choosing. Spans never carry user
text: attributes are ids, counts and reasons, and an error is recorded by its type and reason only
(exception messages can quote prompts or stop strings).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import TracingConfig

TRACER_NAME = "internvl-mesh"

# Span names.
SPAN_CHAT = "gateway.chat"
SPAN_ADMISSION = "gateway.admission"
SPAN_EMBED = "gateway.embed"
SPAN_GENERATE = "gateway.generate"
SPAN_INTERNAL = "gateway.internal"  # an internal client's call through the gateway (tile, embed, ...)
SPAN_ENCODER = "encoder.embed"
SPAN_CACHE_LOOKUP = "encoder.cache_lookup"
SPAN_ENCODE = "encoder.encode"
SPAN_PREPROCESS = "preprocess.tile"
SPAN_DECODER = "decoder.generate"
SPAN_PREFILL = "decoder.prefill"
SPAN_DECODE = "decoder.decode"

# Attribute names.
ATTR_REQUEST_ID = "internvl.request_id"
ATTR_TENANT = "internvl.tenant"
ATTR_MODEL = "internvl.model"
ATTR_IMAGES = "internvl.images"
ATTR_TILES = "internvl.tiles"
ATTR_CACHE_HIT = "internvl.cache.hit"
ATTR_PROMPT_TOKENS = "internvl.prompt_tokens"
ATTR_COMPLETION_TOKENS = "internvl.completion_tokens"
ATTR_FINISH_REASON = "internvl.finish_reason"
ATTR_RPC_METHOD = "rpc.method"  # OpenTelemetry's name: the internal method called (TileImages, ...)

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured = False


def setup_tracing(cfg: TracingConfig, service: str, exporter: Any = None) -> None:
    """Install the process's tracer provider (once). ``exporter`` overrides the OTLP exporter (tests)."""
    global _configured
    with _lock:
        if _configured or not cfg.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": f"{cfg.service_name}-{service}"}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sampling_ratio)),
        )
        if exporter is None:
            exporter = _otlp_exporter(cfg)
        if exporter is not None:
            provider.add_span_processor(
                BatchSpanProcessor(exporter, schedule_delay_millis=cfg.export_delay_ms)
            )
        trace.set_tracer_provider(provider)
        _configured = True


def _otlp_exporter(cfg: TracingConfig):
    import os

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    if cfg.otlp_endpoint:
        return OTLPSpanExporter(
            endpoint=cfg.otlp_endpoint, insecure=not cfg.otlp_endpoint.startswith("https://")
        )
    # The standard variables; the exporter reads the rest of OTEL_EXPORTER_OTLP_* itself.
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return OTLPSpanExporter()
    return None


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_carrier() -> dict[str, str]:
    """The current span's W3C trace context, to send along a hop."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


@contextmanager
def span_from(
    carrier: Mapping[str, str] | None, name: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[trace.Span]:
    """A span whose parent is the caller's span named by ``carrier`` (a hop's trace context)."""
    parent = _propagator.extract(dict(carrier or {}))
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(
            name, kind=trace.SpanKind.SERVER, attributes=_clean(attributes)
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
    with tracer().start_as_current_span(name, attributes=_clean(attributes)) as s:
        yield s


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


def start_span(
    name: str,
    *,
    parent: trace.Span | None = None,
    carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    server: bool = False,
) -> trace.Span:
    """Start a span that is *not* made current: for async generators, whose code resumes in other
    contexts between yields. Its parent is ``parent``, else the span named by ``carrier`` (a hop inside
    the mesh), else the current span. End it with ``span.end()``."""
    if parent is not None:
        ctx = trace.set_span_in_context(parent)
    elif carrier is not None:
        ctx = _propagator.extract(dict(carrier))
    else:
        ctx = None
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    return tracer().start_span(name, context=ctx, kind=kind, attributes=_clean(attributes))


def start_root_span(
    name: str, *, caller: Mapping[str, str] | None = None, attributes: Mapping[str, Any] | None = None
) -> trace.Span:
    """A new trace for a request from outside the mesh: no parent, sampled by the mesh's sampler, the
    caller's trace context (``traceparent`` / ``tracestate``) recorded as a link only."""
    links = []
    if caller:
        linked = trace.get_current_span(_propagator.extract(dict(caller))).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    return tracer().start_span(
        name,
        context=otel_context.Context(),
        kind=trace.SpanKind.SERVER,
        attributes=_clean(attributes),
        links=links,
    )


def carrier_of(span_: trace.Span) -> dict[str, str]:
    """The W3C trace context naming ``span_`` as the parent of the next hop's spans."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span_))
    return carrier


def record_error(span_: trace.Span, exc: BaseException) -> None:
    """The error's type and reason, never its message (it can quote the caller's text)."""
    from opentelemetry.trace import Status, StatusCode

    reason = getattr(exc, "reason", None) or type(exc).__name__
    span_.add_event("exception", {"exception.type": type(exc).__name__, "internvl.error.reason": reason})
    span_.set_status(Status(StatusCode.ERROR, reason))
