"""API keys → tenants: authentication, live reload of the tenants file, and key creation.

A key is ``ivm-<key_id>-<secret>``. The key id is public (it may be logged and names the key in the
file); the secret is 43 url-safe characters from ``secrets``. The file stores only the digest of the
whole key string: HMAC-SHA256 under a server-side secret when the file names one (``hmac_secret_env``),
plain SHA-256 otherwise. A presented key is digested, the entry is looked up by that digest, and the
digests are compared once more with ``hmac.compare_digest``: nothing compares key material in plain
text, and nothing here logs or stores a key.

Keys change without a restart: ``KeyStore.start()`` runs a background task that re-reads the file every
``reload_interval_s`` (2 s by default) and swaps in the new key set when its content hash changed, so
revoking (``revoked: true`` or deleting the entry), rotating (two entries for one tenant, both valid
until the old one is removed) and adding keys take effect within one interval. The content is hashed
rather than trusting the mtime alone: a same-size rewrite within one mtime tick would be missed, and a
Kubernetes secret update swaps a symlink whose target keeps an old mtime. A file that fails to parse
is refused as a whole and the previous key set stays in force (half-written files must not lock every
tenant out); the failure is logged and kept in ``last_reload_error``.

Authentication yields a ``Principal``: the tenant the key acts for, the key's id and its scopes (what
it may call: ``chat``, ``tile``, ``embed``, ``decode``; ``Principal.require`` refuses the others with
PERMISSION_DENIED, reason ``scope_not_granted``).

Without a file the store is single-tenant: every request, with or without a key, acts for one
``default`` tenant with generous limits and every scope (development only: whoever reaches the
gateway may then call the internal services too). Any file, even one with no tenants, means
multi-tenant: emptying the file revokes everything rather than opening the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import ValidationError

from gateway.tenancy.config import (
    KEY_ID_PATTERN,
    SCOPES,
    ApiKeyEntry,
    Tenant,
    TenantLimits,
    TenantsFile,
    parse_key_id,
)
from services.common.config import ConfigError, format_validation_error
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

KEY_PREFIX = "ivm"
DEFAULT_TENANT = "default"
EnvLookup = Callable[[str], str | None]


def key_digest(api_key: str, hmac_secret: bytes | None) -> str:
    """Hex digest of a whole key string: HMAC-SHA256 under ``hmac_secret``, or SHA-256 without one."""
    data = api_key.encode("utf-8")
    if hmac_secret:
        return hmac.new(hmac_secret, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def create_key(
    tenant: str,
    *,
    key_id: str | None = None,
    expires_at: datetime | None = None,
    hmac_secret: bytes | None = None,
    now: datetime | None = None,
    scopes: Sequence[str] | None = None,
) -> tuple[str, ApiKeyEntry]:
    """Make a new key for ``tenant``: returns the plain key (show it once) and the entry to store.

    ``hmac_secret`` must be the secret the gateway uses (the value of the file's ``hmac_secret_env``),
    or None when the file has none. ``key_id`` defaults to 12 random hex characters; ``scopes`` to
    ``["chat"]``.
    """
    key_id = key_id if key_id is not None else secrets.token_hex(6)
    if not re.fullmatch(KEY_ID_PATTERN, key_id):
        raise InvalidArgument(f"key_id {key_id!r} must be 1-64 letters, digits or '_' (no '-')")
    plain = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
    fields = {"scopes": list(scopes)} if scopes is not None else {}
    try:
        entry = ApiKeyEntry(
            key_id=key_id,
            tenant=tenant,
            digest=key_digest(plain, hmac_secret),
            created_at=(now or datetime.now(UTC)).replace(microsecond=0),
            expires_at=expires_at,
            **fields,
        )
    except ValidationError as exc:
        raise InvalidArgument(format_validation_error(exc, "the new key")) from None
    return plain, entry


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant a key acts for, the key's public id (None in single-tenant mode) and
    what the key may call."""

    tenant: Tenant
    key_id: str | None
    scopes: frozenset[str]
    digest: str | None = field(default=None, compare=False, repr=False)  # of the stored entry

    def require(self, scope: str) -> None:
        """PermissionDenied (reason ``scope_not_granted``) unless the key holds ``scope``."""
        if scope not in self.scopes:
            raise PermissionDenied(
                f"API key {self.key_id} is not granted the {scope!r} scope (it holds "
                f"{', '.join(sorted(self.scopes))})",
                reason="scope_not_granted",
            )


def default_tenant() -> Tenant:
    """The single tenant of a deployment without a tenants file."""
    return Tenant(name=DEFAULT_TENANT, allowed_models=["*"], limits=TenantLimits.generous(), priority=0)


class Authenticator(Protocol):
    """What the gateway asks of a key store (``KeyStore`` is the one we serve with)."""

    def authenticate(self, api_key: str | None) -> Principal:
        """Who ``api_key`` is; Unauthenticated (with a reason) if it acts for no tenant."""
        ...

    def check(self, principal: Principal) -> None:
        """Unauthenticated if ``principal``'s key stopped being valid since it authenticated."""
        ...


@dataclass(frozen=True)
class _KeySet:
    """One consistent snapshot of the file; replaced whole on reload, so a lookup never sees a mix."""

    tenants: Mapping[str, Tenant]
    by_digest: Mapping[str, ApiKeyEntry]
    hmac_secret: bytes | None
    content_hash: str = ""
    default: Tenant | None = None  # set only in single-tenant mode

    @property
    def single_tenant(self) -> bool:
        return self.default is not None


class KeyStore:
    """Authenticates API keys against the tenants file and keeps the file's keys current.

    ``path`` None runs single-tenant. ``env`` resolves the file's ``hmac_secret_env`` to the secret; it
    defaults to ``os.environ.get`` because this constructor is what the entry point calls; tests and
    embedders pass their own. ``now`` returns the current UTC time (key expiry).

    Raises ``ConfigError`` at construction if the file is missing or invalid, or names a secret
    variable that is unset: a gateway must not start with keys it cannot check.
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        env: EnvLookup = os.environ.get,
        reload_interval_s: float = 2.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        single_tenant_default: Tenant | None = None,
    ):
        if not 0.05 <= reload_interval_s <= 3600:
            raise ConfigError(f"reload_interval_s must be in [0.05, 3600], got {reload_interval_s}")
        self.path = Path(path) if path is not None else None
        self.reload_interval_s = reload_interval_s
        self.last_reload_error: str | None = None
        self.reload_count = 0
        self._env = env
        self._now = now
        self._task: asyncio.Task[None] | None = None
        if self.path is None:
            tenant = single_tenant_default or default_tenant()
            self._keys = _KeySet(
                tenants={tenant.name: tenant},
                by_digest={},
                hmac_secret=None,
                default=tenant,
            )
        else:
            self._keys = self._load(self.path.read_bytes() if self.path.is_file() else None)

    # -- state --------------------------------------------------------------------------------------
    @property
    def single_tenant(self) -> bool:
        """True without a tenants file: no keys are checked (the entry point says so at start-up)."""
        return self._keys.single_tenant

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._keys.tenants

    @property
    def key_count(self) -> int:
        return len(self._keys.by_digest)

    # -- authentication -----------------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> Principal:
        """Who ``api_key`` is (its tenant, key id and scopes); Unauthenticated if it is missing,
        unknown, revoked or expired. Single-tenant mode: the default tenant with every scope.

        The reason on the error tells the caller which (``missing_api_key``, ``invalid_api_key``,
        ``key_revoked``, ``key_expired``); the message never contains the key.
        """
        keys = self._keys
        if keys.default is not None:
            return Principal(keys.default, None, frozenset(SCOPES))
        if not api_key:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>'", reason="missing_api_key"
            )
        presented = key_digest(api_key, keys.hmac_secret)
        entry = keys.by_digest.get(presented)
        # The dict lookup finds the candidate; the decision is a constant-time comparison of digests.
        stored = entry.digest if entry is not None else "0" * 64
        if not hmac.compare_digest(presented, stored) or entry is None:
            key_id = parse_key_id(api_key)
            log.info("authentication failed: unknown key (key id %s)", key_id or "unparseable")
            raise Unauthenticated("invalid API key", reason="invalid_api_key")
        if entry.revoked:
            log.info("authentication failed: key %s of tenant %s is revoked", entry.key_id, entry.tenant)
            raise Unauthenticated(f"API key {entry.key_id} has been revoked", reason="key_revoked")
        if entry.expired(self._now()):
            log.info("authentication failed: key %s of tenant %s expired", entry.key_id, entry.tenant)
            raise Unauthenticated(f"API key {entry.key_id} has expired", reason="key_expired")
        return Principal(keys.tenants[entry.tenant], entry.key_id, frozenset(entry.scopes), entry.digest)

    def check(self, principal: Principal) -> None:
        """Unauthenticated if the key ``principal`` authenticated with has since been revoked, removed
        or has expired (the key set as last reloaded): a request in flight stops within one reload."""
        if principal.digest is None:
            return  # single-tenant: no key to revoke
        entry = self._keys.by_digest.get(principal.digest)
        if entry is None or entry.revoked:
            raise Unauthenticated(f"API key {principal.key_id} has been revoked", reason="key_revoked")
        if entry.expired(self._now()):
            raise Unauthenticated(f"API key {principal.key_id} has expired", reason="key_expired")

    def create_key(
        self,
        tenant: str,
        *,
        key_id: str | None = None,
        expires_at: datetime | None = None,
        scopes: Sequence[str] | None = None,
    ) -> tuple[str, ApiKeyEntry]:
        """``create_key`` with this store's HMAC secret, for a tenant the file defines.

        The caller appends the entry to the file; the key works after the next reload.
        """
        if self.single_tenant:
            raise InvalidArgument("no tenants file: single-tenant mode has no keys")
        if tenant not in self._keys.tenants:
            raise InvalidArgument(f"unknown tenant {tenant!r}: add it to the tenants file first")
        return create_key(
            tenant,
            key_id=key_id,
            expires_at=expires_at,
            hmac_secret=self._keys.hmac_secret,
            scopes=scopes,
        )

    # -- loading ------------------------------------------------------------------------------------
    def _load(self, raw: bytes | None) -> _KeySet:
        source = str(self.path)
        if raw is None:
            raise ConfigError(f"tenants file {source} does not exist")
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"tenants file {source} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"tenants file {source} must hold a mapping at the top level")
        try:
            parsed = TenantsFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        secret: bytes | None = None
        if parsed.hmac_secret_env:
            value = self._env(parsed.hmac_secret_env)
            if not value:
                raise ConfigError(
                    f"tenants file {source} names hmac_secret_env {parsed.hmac_secret_env!r}, "
                    "but that environment variable is unset or empty"
                )
            secret = value.encode("utf-8")
        return _KeySet(
            tenants={t.name: t for t in parsed.tenants},
            by_digest={k.digest: k for k in parsed.keys},
            hmac_secret=secret,
            content_hash=hashlib.sha256(raw).hexdigest(),
        )

    def reload(self) -> bool:
        """Re-read the file now; True if a changed key set was installed.

        An unreadable or invalid file keeps the previous key set (logged, ``last_reload_error``).
        """
        if self.path is None:
            return False
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            return self._reload_failed(f"cannot read {self.path}: {exc}")
        if hashlib.sha256(raw).hexdigest() == self._keys.content_hash:
            return False
        try:
            keys = self._load(raw)
        except ConfigError as exc:
            return self._reload_failed(str(exc))
        self._keys = keys
        self.reload_count += 1
        self.last_reload_error = None
        log.info(
            "tenants file reloaded: %d tenants, %d keys (content %s)",
            len(keys.tenants),
            len(keys.by_digest),
            keys.content_hash[:12],
        )
        return True

    def _reload_failed(self, message: str) -> bool:
        if message != self.last_reload_error:
            log.error("tenants file not reloaded, previous keys stay in force: %s", message)
        self.last_reload_error = message
        return False

    # -- background reload --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start reloading every ``reload_interval_s`` on the running loop (no-op when single-tenant)."""
        if self.path is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._reload_loop(), name="tenancy-key-reload")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                # A mounted secret may sit on a slow volume: read it off the event loop.
                await asyncio.to_thread(self.reload)
            except Exception:  # the loop must survive anything; the next tick tries again
                log.exception("tenants file reload failed unexpectedly")

    async def __aenter__(self) -> KeyStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
