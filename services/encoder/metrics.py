"""Prometheus metrics of the vision encoder.

Registered on the registry passed in (tests and multi-app processes use their own) or on the default
one. Collectors are created once per registry, so building several encoder cores in one process (two
models, or tests) does not trip prometheus_client's duplicate-name check.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_TILE_BUCKETS = (1, 2, 4, 8, 13, 16, 24, 32, 48, 64, 96, 128, 256, 512)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, EncoderMetrics] = weakref.WeakKeyDictionary()


class EncoderMetrics:
    """All collectors; label ``model`` names the checkpoint so one process may serve several."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.batch_tiles = Histogram(
            "internvl_mesh_encoder_batch_tiles",
            "Tiles per vision forward.",
            ["model"],
            buckets=_TILE_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "internvl_mesh_encoder_batch_requests",
            "Requests whose tiles share one vision forward.",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "internvl_mesh_encoder_queue_seconds",
            "Time from submission to the start of a request's first forward.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "internvl_mesh_encoder_forward_seconds",
            "Duration of one vision forward.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.queued_tiles = Gauge(
            "internvl_mesh_encoder_queued_tiles", "Tiles waiting for a forward.", ["model"], registry=r
        )
        self.images = Counter(
            "internvl_mesh_encoder_images",
            "Images answered, by outcome: hit (cache), encoded, joined (another request's encode).",
            ["model", "outcome"],
            registry=r,
        )
        self.tiles_encoded = Counter(
            "internvl_mesh_encoder_tiles_encoded", "Tiles run through the ViT.", ["model"], registry=r
        )
        self.tenant_queue_seconds = Histogram(
            "internvl_mesh_encoder_tenant_queue_seconds",
            "Time from submission to a request's first forward, per tenant (bounded labels).",
            ["model", "tenant"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.tenant_tiles = Counter(
            "internvl_mesh_encoder_tenant_tiles",
            "Tiles run through the ViT per tenant (bounded labels): the unit of the encoder's fair share.",
            ["model", "tenant"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "internvl_mesh_encoder_cache_lookups",
            "Cache lookups by level and result.",
            ["model", "level", "result"],
            registry=r,
        )
        self.store_events = Counter(
            "internvl_mesh_encoder_store_events",
            "Redis store events: corrupt, error, timeout, oom, breaker_open, breaker_closed, skipped.",
            ["model", "event"],
            registry=r,
        )
        self.degraded = Counter(
            "internvl_mesh_encoder_degraded",
            "Images answered without the shared cache because it failed (reference kind object or inline).",
            ["model", "reason"],
            registry=r,
        )
        self.cache_available = Gauge(
            "internvl_mesh_encoder_cache_available",
            "1 while the shared cache is usable, 0 while its breaker is open.",
            ["model"],
            registry=r,
        )


def encoder_metrics(registry: CollectorRegistry | None = None) -> EncoderMetrics:
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = EncoderMetrics(registry)
            _by_registry[registry] = metrics
        return metrics
