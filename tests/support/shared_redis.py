"""The Redis the suites share: its URL, one db per suite, and a client that cleans up after a suite.

``INTERNVL_MESH_TEST_REDIS`` names the server (default ``redis://127.0.0.1:6379/9``; ``.ci/run`` starts
one there). The session-wide ``redis_url`` fixture uses that URL as it is; each suite that writes keys
gets the same server with its own db number from ``SUITE_DBS``, and inside it a key prefix unique to
the run, so suites (and concurrent runs) never see or delete each other's keys.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/9"

# One db per suite; the session fixture's db is the one in the URL (9 by default).
SUITE_DBS = {
    "encoder": 7,
    "embedding_cache": 8,
    "gateway.tenancy": 11,
    "gateway": 12,
    "gateway.ops": 13,
    "security": 14,
}


def redis_url(suite: str | None = None) -> str:
    """``INTERNVL_MESH_TEST_REDIS`` (or the default), with the db of ``suite`` when one is named."""
    base = os.environ.get("INTERNVL_MESH_TEST_REDIS", DEFAULT_URL)
    if suite is None:
        return base
    return urlsplit(base)._replace(path=f"/{SUITE_DBS[suite]}").geturl()


@contextlib.contextmanager
def suite_redis(url: str, *patterns: str):
    """A client of the shared Redis at ``url`` (failing the suite at once if it is down); on exit,
    every key matching one of ``patterns`` is deleted."""
    import pytest

    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {url}: .ci/run starts it; start it for local runs")
    try:
        yield client
    finally:
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        client.close()
