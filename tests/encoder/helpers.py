"""What the encoder suite's tests share: its Redis (db 7) and the run's namespace.

Every key the suite writes lives in that db under a namespace unique to this run (``RUN_NS``), or under
``RUN_NS`` as the key prefix; the suite's ``sync_redis`` fixture deletes both when the session ends.
"""

from __future__ import annotations

import uuid

from tests.support.shared_redis import redis_url

REDIS_URL = redis_url("encoder")
RUN_NS = f"enctest-{uuid.uuid4().hex[:8]}"


def namespace(name: str = "") -> str:
    """A cache namespace owned by this run (cleaned up at the end)."""
    return f"{RUN_NS}-{name or uuid.uuid4().hex[:6]}"
