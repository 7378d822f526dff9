"""A caller's trace context decides nothing: with the mesh sampling no request (ratio 0), a caller that
sends a ``traceparent`` with the sampled flag set gets no span exported; with every request sampled,
the caller's trace is a link of the mesh's root, never its parent, and no span carries the request's
text, not even an error's message. Run in a process of its own (a tracer provider is set once per
process): a real gateway with the tiny checkpoint's encoder and decoder, an in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import asyncio, json, sys
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from gateway.tenancy.keys import KeyStore
from gateway.tenancy.limiter import LocalLimiter
from gateway.types import ChatRequest, ImagePart, Message, TextPart
from services.common import tracing
from services.common.config import TracingConfig
from tests.support.gateway import local_cores, make_gateway
from tests.support.images import png

ratio, checkpoint = float(sys.argv[1]), sys.argv[2]
exporter = InMemorySpanExporter()
tracing.setup_tracing(TracingConfig(sampling_ratio=ratio, export_delay_ms=10), "gateway", exporter)
CALLER = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRET_TEXT = "the-callers-private-words"

async def ask(gateway, image=False, **fields):
    parts = [ImagePart(png(448, 448, seed=1), None)] if image else []
    req = ChatRequest(model="tiny", messages=[Message("user", [*parts, TextPart(SECRET_TEXT)])], **fields)
    req.trace = {"traceparent": f"00-{CALLER}-00f067aa0ba902b7-01"}
    try:
        async for _ in gateway.chat(req, await gateway.authenticate(None)):
            pass
    except Exception as exc:
        return type(exc).__name__

with local_cores(checkpoint) as cores:
    gateway = make_gateway(cores, KeyStore(None), LocalLimiter())
    asyncio.run(ask(gateway, max_tokens=2, temperature=0.0))
    # Refused inside the request's root span: the prompt with its image does not fit the context.
    room = cores["decoder"].max_model_len - 20
    asyncio.run(ask(gateway, image=True, max_tokens=room, stop=[SECRET_TEXT]))
from opentelemetry import trace
trace.get_tracer_provider().force_flush()
spans = exporter.get_finished_spans()
print(json.dumps([{
    "name": s.name,
    "trace_id": format(s.context.trace_id, "032x"),
    "parent": bool(s.parent),
    "links": [format(l.context.trace_id, "032x") for l in s.links],
    "text": repr([dict(s.attributes), [(e.name, dict(e.attributes)) for e in s.events], s.status.description]),
} for s in spans]))
"""


def _spans(ratio: float, checkpoint) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ratio), str(checkpoint)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_callers_traceparent_neither_forces_sampling_nor_parents_the_mesh_trace(tiny_checkpoint):
    assert _spans(0.0, tiny_checkpoint) == []
    spans = _spans(1.0, tiny_checkpoint)
    roots = [s for s in spans if s["name"] == "gateway.chat"]
    assert len(roots) == 2
    for root in roots:
        assert not root["parent"] and root["links"] == ["4bf92f3577b34da6a3ce929d0e0e4736"]
    assert {s["trace_id"] for s in spans}.isdisjoint({"4bf92f3577b34da6a3ce929d0e0e4736"})
    assert [s["name"] for s in spans if "the-callers-private-words" in s["text"]] == []
    assert any("context_length_exceeded" in s["text"] for s in roots)  # the error, by its reason
