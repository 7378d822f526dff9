"""The decoder's own load signals for Serve's custom autoscaling (mesh/autoscaling.py's policy).

``waiting_tokens``: prompt tokens the scheduler has not computed yet, over the waiting requests (what a
new replica would take off this one); ``kv_usage``: the fraction of KV-cache blocks in use. The engine
reports both in ``DecoderCore.stats()``; the deployment returns :func:`autoscaling_stats` of them from
``record_autoscaling_stats``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def waiting_tokens(requests: Iterable[Any]) -> int:
    """Tokens still to compute over ``requests`` (the scheduler's ``Request`` objects)."""
    return sum(max(0, r.num_tokens - r.num_computed_tokens) for r in requests)


def autoscaling_stats(stats: Mapping[str, float]) -> dict[str, float]:
    """What the decoder's ``record_autoscaling_stats`` returns, from the engine's stats."""
    return {
        "waiting_tokens": float(stats.get("waiting_tokens", 0.0)),
        "kv_usage": float(stats.get("kv_usage", 0.0)),
    }
