"""Store failures the encoder answers by itself (degraded mode), never passed on to a caller."""

from __future__ import annotations

from services.common.errors import Unavailable


class StoreUnavailable(Unavailable):
    """The shared cache cannot be used now (down, slow, or its circuit breaker is open)."""

    reason = "cache_unavailable"


class StoreFull(StoreUnavailable):
    """The shared cache refuses writes (Redis out of memory); reads may still work."""

    reason = "cache_full"
