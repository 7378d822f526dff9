"""What the tenancy suite's tests share: its Redis (db 11), the run's key prefix and fresh tenants.

Every key the suite writes lives in that db under ``RUN_PREFIX`` (unique to this run); the suite's
``sync_redis`` fixture deletes them when the session ends.
"""

from __future__ import annotations

import uuid

from gateway.tenancy import Tenant, TenantLimits
from tests.support.shared_redis import redis_url

REDIS_URL = redis_url("gateway.tenancy")
RUN_PREFIX = f"ivm:limtest:{uuid.uuid4().hex[:8]}:"


def make_tenant(name: str | None = None, **limits) -> Tenant:
    """A tenant with a fresh name (so tests never share counters) and the given limits."""
    return Tenant(name=name or f"t{uuid.uuid4().hex[:10]}", limits=TenantLimits(**limits))
