"""What the embedding-cache suite's tests share: its Redis (db 8) and the run's key prefix.

Every key the suite writes lives in that db under the conformance suite's ``conformance:`` prefix or
under ``RUN_PREFIX`` (a key prefix unique to this run); the suite's ``sync_redis`` fixture deletes both
when the session ends.
"""

from __future__ import annotations

import uuid

from tests.support.shared_redis import redis_url

REDIS_URL = redis_url("embedding_cache")
RUN_PREFIX = f"ecachetest-{uuid.uuid4().hex[:8]}"
