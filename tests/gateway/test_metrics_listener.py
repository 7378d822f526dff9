"""The gateway's metrics listener: Prometheus text on ``GET /metrics`` of its own port, nothing else there,
and several listeners (gateway replicas on one node) share one port instead of failing to start."""

import httpx
from prometheus_client import CollectorRegistry

from gateway.core import RequestRecord
from gateway.metrics import METRIC_NAMES, GatewayMetrics, MetricsListener


def _registry_with_one_request() -> CollectorRegistry:
    registry = CollectorRegistry()
    GatewayMetrics(registry).on_complete(
        RequestRecord(
            request_id="r1",
            tenant="acme",
            model="m",
            started=0.0,
            prompt_tokens=10,
            completion_tokens=3,
            image_tokens=4,
            images=1,
            cache_hits=0,
            tile_counts=[1],
            latency_s=0.5,
            ttft_s=0.1,
            queue_s=0.0,
        )
    )
    return registry


def test_metrics_on_their_own_port_and_nothing_else():
    listener = MetricsListener("127.0.0.1", 0, _registry_with_one_request())
    try:
        base = f"http://127.0.0.1:{listener.port}"
        r = httpx.get(base + "/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        for name in METRIC_NAMES:
            assert name in r.text, name
        assert 'internvl_mesh_requests_total{model="m",status="ok",tenant="acme"} 1.0' in r.text
        for path in ("/", "/v1/models", "/metrics/x", "/health"):
            assert httpx.get(base + path, timeout=10).status_code == 404, path
    finally:
        listener.close()


def test_replicas_on_one_node_share_the_port():
    first = MetricsListener("127.0.0.1", 0, _registry_with_one_request())
    second = MetricsListener("127.0.0.1", first.port, _registry_with_one_request())
    try:
        assert second.port == first.port
        for _ in range(4):  # whichever replica the kernel picks answers with its own registry
            r = httpx.get(f"http://127.0.0.1:{first.port}/metrics", timeout=10)
            assert r.status_code == 200 and "internvl_mesh_requests_total" in r.text
    finally:
        first.close()
        second.close()
