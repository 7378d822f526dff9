"""The audit log: who failed to authenticate, who was refused by a limit, which keys changed.

Every event is one line on the ``internvl_mesh.audit`` logger whose message is a JSON object
(``{"event": "auth_failure", "key_id": "k1a2b3", "reason": "key_revoked"}``), also attached to the log
record as ``record.audit`` for JSON formatters; route that logger wherever audit trails are kept. The
lines name keys by their public key id and never carry a key, a digest or the HMAC secret: the key id is
parsed from the presented key by the gateway before the observer is called, so this module never sees a
key at all.

Events:

- ``auth_failure`` (``reason``: missing_api_key, invalid_api_key, key_revoked, key_expired, or
  scope_not_granted for a valid key calling what its scopes do not cover; ``key_id`` of the presented
  key, ``none`` when there was no key or it had no parseable id);
- ``limit_rejected`` (``tenant``, ``reason``: rate_limited, tokens_per_min, concurrency, daily_quota,
  limiter_unavailable);
- ``key_added``, ``key_removed``, ``key_revoked``, ``key_restored``, ``key_expiry_changed``
  (``key_id``, ``tenant``, ``expires_at``), ``key_scopes_changed`` (``key_id``, ``tenant``, ``scopes``), ``tenant_added``, ``tenant_removed`` (``tenant``): the
  differences between two successive loads of the tenants file, seen by ``AuditedKeyStore``;
- ``tenants_file_rejected`` (``path``): a changed file failed to load and the previous keys stay in force
  (the reason is in the gateway's own log, which the key store writes).

The services write ``context_refused`` on the same logger (``services.common.context``): a request
context without a valid, unexpired signature reached one of their entry points.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.core import RequestRecord
from gateway.tenancy.config import ApiKeyEntry
from gateway.tenancy.keys import KeyStore
from services.common.audit import AUDIT_LOGGER, audit_event


class AuditLog:
    """Writes audit events; also a ``GatewayObserver`` (``on_auth_failure``, ``on_rejected``)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger(AUDIT_LOGGER)

    def event(self, event: str, **fields: Any) -> None:
        audit_event(event, self.logger, **fields)

    # -- GatewayObserver ------------------------------------------------------------------------
    def on_complete(self, record: RequestRecord) -> None:
        """Finished requests are usage, not audit (see ``gateway.usage``)."""

    def on_auth_failure(self, reason: str, key_id: str | None) -> None:
        self.event("auth_failure", reason=reason, key_id=key_id or "none")

    def on_rejected(self, tenant: str, reason: str) -> None:
        self.event("limit_rejected", tenant=tenant, reason=reason)


@dataclass(frozen=True)
class KeyChange:
    event: str
    tenant: str
    key_id: str | None = None
    expires_at: str | None = None
    scopes: str | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "key_id": self.key_id,
            "expires_at": self.expires_at,
            "scopes": self.scopes,
        }


def diff_keys(
    before: Mapping[str, ApiKeyEntry],
    after: Mapping[str, ApiKeyEntry],
    tenants_before: set[str] = frozenset(),
    tenants_after: set[str] = frozenset(),
) -> list[KeyChange]:
    """What changed between two loads of the tenants file, keys by key id, in a stable order."""
    changes = [KeyChange("tenant_added", t) for t in sorted(tenants_after - tenants_before)]
    for key_id in sorted(before.keys() | after.keys()):
        old, new = before.get(key_id), after.get(key_id)
        if new is None:
            changes.append(KeyChange("key_removed", old.tenant, key_id))
            continue
        expires = new.expires_at.isoformat() if new.expires_at else None
        if old is None:
            changes.append(
                KeyChange("key_revoked" if new.revoked else "key_added", new.tenant, key_id, expires)
            )
        elif new.revoked != old.revoked:
            changes.append(KeyChange("key_revoked" if new.revoked else "key_restored", new.tenant, key_id))
        elif new.digest != old.digest or new.tenant != old.tenant:
            changes.append(KeyChange("key_removed", old.tenant, key_id))
            changes.append(KeyChange("key_added", new.tenant, key_id, expires))
        elif new.expires_at != old.expires_at:
            changes.append(KeyChange("key_expiry_changed", new.tenant, key_id, expires or "never"))
        same_key = old is not None and (new.digest, new.tenant) == (old.digest, old.tenant)
        if same_key and not new.revoked and new.scopes != old.scopes:
            scopes = ",".join(new.scopes)
            changes.append(KeyChange("key_scopes_changed", new.tenant, key_id, scopes=scopes))
    changes += [KeyChange("tenant_removed", t) for t in sorted(tenants_before - tenants_after)]
    return changes


class AuditedKeyStore(KeyStore):
    """A ``KeyStore`` whose reloads write ``key_*`` / ``tenant_*`` audit events.

    Reloads happen in the key store's background task, so a key revoked in the file is audited by every
    replica once it takes effect there: the audit line marks when the change was in force, not when
    someone edited the file.
    """

    def __init__(self, path: str | Path | None, *, audit: AuditLog, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.audit = audit
        self._seen = self._snapshot()
        self._seen_error: str | None = None

    def _snapshot(self) -> tuple[dict[str, ApiKeyEntry], set[str]]:
        keys = self._keys  # one consistent snapshot, replaced whole by reload()
        return {e.key_id: e for e in keys.by_digest.values()}, set(keys.tenants)

    def reload(self) -> bool:
        changed = super().reload()
        if changed:
            (before, tenants_before), now = self._seen, self._snapshot()
            for change in diff_keys(before, now[0], tenants_before, now[1]):
                self.audit.event(change.event, **change.fields())
            self._seen = now
        elif self.last_reload_error and self.last_reload_error != self._seen_error:
            self.audit.event("tenants_file_rejected", path=str(self.path))
        self._seen_error = self.last_reload_error
        return changed
