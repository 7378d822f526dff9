"""Tenant label values with bounded cardinality, for the per-tenant metrics of every service.

An allow-list (the gateway's ``ops.metrics.tenant_labels``, a service's ``tenant_labels``) names the
tenants that get their own value; the rest are ``other``. Without one, the first ``max_distinct``
tenants a process sees get their own value and later ones ``other``, so a process never holds an
unbounded number of series. Requests without a tenant (no tenants file) are ``none``.
"""

from __future__ import annotations

from collections.abc import Iterable

OTHER = "other"
NONE = "none"


class TenantLabels:
    def __init__(self, allowed: Iterable[str] | None = None, max_distinct: int = 64):
        self.allowed = set(allowed) if allowed is not None else None
        self.max_distinct = max_distinct
        self._seen: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if not tenant:
            return NONE
        if self.allowed is not None:
            return tenant if tenant in self.allowed else OTHER
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self.max_distinct:
            self._seen.add(tenant)
            return tenant
        return OTHER
