"""The gateway's Prometheus metrics, with the names people know from vLLM under ``internvl_mesh_``, and
the listener that serves them.

Each gateway replica serves its own process's registry on ``GET /metrics`` of its own listener
(``MetricsListener``: ``gateway.metrics_port`` on ``gateway.host``), never on the public HTTP port. The
listener sets SO_REUSEPORT, as the public gRPC server does, so several replicas on one node share the
port: the kernel hands each connection to one of them, so one scrape reads one replica's registry.
The decoder's gauges (running and waiting requests, KV-cache
usage, preemptions) live in its replicas and are exported through Ray's metrics agent on every node
(``ray_internvl_mesh_*``); the encoder's (``internvl_mesh_encoder_*``) are registered in its own
process. See the README's "Observability" section. Tenant labels are bounded: tenants outside
``tenant_labels`` (when given) are counted as ``other``.

Every finished request is counted, internal calls through the gateway included (tile, embed, decode,
count_tokens: ``RequestRecord.operation``); the latency histograms describe requests that generate
(chat and decode), as vLLM's do, so a tiling call never shows up as a fast chat, and the cache
counters the requests that ask the embedding cache (chat and embed).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app

from gateway.core import RequestRecord

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)

GENERATING = frozenset({"chat", "decode"})  # operations whose latency the histograms describe
EMBEDDING = frozenset({"chat", "embed"})  # operations that ask the embedding cache

METRIC_NAMES = (
    "internvl_mesh_requests_total",
    "internvl_mesh_time_to_first_token_seconds",
    "internvl_mesh_time_per_output_token_seconds",
    "internvl_mesh_e2e_request_latency_seconds",
    "internvl_mesh_request_queue_time_seconds",
    "internvl_mesh_prompt_tokens_total",
    "internvl_mesh_generation_tokens_total",
    "internvl_mesh_image_tokens_total",
    "internvl_mesh_embedding_cache_hits_total",
    "internvl_mesh_embedding_cache_misses_total",
    "internvl_mesh_tiles_per_image",
)


class GatewayMetrics:
    """A ``GatewayObserver`` that turns each finished request into metric updates."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, tenant_labels: Iterable[str] | None = None):
        self.tenant_labels = set(tenant_labels) if tenant_labels is not None else None
        self.requests = Counter(
            "internvl_mesh_requests",
            "Finished requests by status.",
            ["model", "tenant", "status"],
            registry=registry,
        )
        self.ttft = Histogram(
            "internvl_mesh_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "internvl_mesh_time_per_output_token_seconds",
            "Time per output token after the first.",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "internvl_mesh_e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            "internvl_mesh_request_queue_time_seconds",
            "Time waiting for admission (limits).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "internvl_mesh_prompt_tokens",
            "Prompt tokens (image tokens included).",
            ["model", "tenant"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "internvl_mesh_generation_tokens", "Generated tokens.", ["model", "tenant"], registry=registry
        )
        self.image_tokens = Counter(
            "internvl_mesh_image_tokens", "Image tokens in prompts.", ["model", "tenant"], registry=registry
        )
        self.cache_hits = Counter(
            "internvl_mesh_embedding_cache_hits",
            "Images answered from the embedding cache.",
            ["model"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "internvl_mesh_embedding_cache_misses",
            "Images that had to be encoded.",
            ["model"],
            registry=registry,
        )
        self.tiles = Histogram(
            "internvl_mesh_tiles_per_image",
            "Tiles per image (thumbnail included).",
            ["model"],
            buckets=(1, 2, 3, 5, 7, 9, 13, 17, 25, 33, 41),
            registry=registry,
        )

    def _tenant(self, tenant: str) -> str:
        if self.tenant_labels is None or tenant in self.tenant_labels:
            return tenant
        return "other"

    def on_complete(self, r: RequestRecord) -> None:
        tenant = self._tenant(r.tenant)
        self.requests.labels(r.model, tenant, r.status).inc()
        if r.operation in GENERATING:
            self._latencies(r)
        self.prompt_tokens.labels(r.model, tenant).inc(r.prompt_tokens)
        self.generation_tokens.labels(r.model, tenant).inc(r.completion_tokens)
        self.image_tokens.labels(r.model, tenant).inc(r.image_tokens)
        if r.images and r.operation in EMBEDDING:
            self.cache_hits.labels(r.model).inc(r.cache_hits)
            self.cache_misses.labels(r.model).inc(r.images - r.cache_hits)
        for n in r.tile_counts:
            self.tiles.labels(r.model).observe(n)

    def _latencies(self, r: RequestRecord) -> None:
        self.e2e.labels(r.model).observe(r.latency_s)
        self.queue.labels(r.model).observe(r.queue_s)
        if r.ttft_s is not None:
            self.ttft.labels(r.model).observe(r.ttft_s)
            if r.completion_tokens > 1:
                self.tpot.labels(r.model).observe((r.latency_s - r.ttft_s) / (r.completion_tokens - 1))


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """One line per scrape is noise: log nothing."""


class MetricsListener:
    """Prometheus text format on ``GET /metrics`` at ``host:port`` (anything else: 404), served by a
    daemon thread. ``port`` 0 takes a free one (``.port`` says which)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(ThreadingMixIn, WSGIServer):
            address_family = family
            allow_reuse_port = True  # several gateway replicas on one node share the port
            daemon_threads = True

        self._httpd = make_server(host, port, _only_metrics(make_wsgi_app(registry)), Server, _Quiet)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _only_metrics(app):
    def route(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        return app(environ, start_response)

    return route
