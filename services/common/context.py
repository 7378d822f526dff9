"""The request context: who asks, how urgently, until when; signed by the gateway, verified by every service.

Nothing behind the gateway believes the wire. The gateway authenticates the caller, derives the tenant,
cache namespace and priority from the credential, and signs the context with the mesh secret (an
HMAC-SHA256 over every field that decides identity or scheduling (the tenant's fair-share weight and KV
share included), plus an expiry). Each service verifies
the signature on every entry point it has (Ray handle methods and gRPC servicers) and refuses an
unsigned, tampered or expired context with UNAUTHENTICATED; what it then uses comes from the verified
context only. The trace context is not signed: it names a span, never who asks.

The gateway signs every hop afresh (``ContextSigner.sign``), so a context lives ``ttl_s`` (60 s by
default) plus the clock skew allowed between nodes; it is checked when a request enters a service, not
while it runs. A service forwarding a request (encoder to preprocess) passes the context it verified.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from services.common.audit import audit_event
from services.common.errors import FailedPrecondition, Unauthenticated
from services.common.limits import MAX_PRIORITY, MAX_WEIGHT, MIN_WEIGHT
from services.common.refs import DEFAULT_NAMESPACE

MESH_SECRET_ENV = "IVM_MESH_SECRET"
MIN_SECRET_BYTES = 32
_DOMAIN = b"internvl-mesh/request-context/v2"


@dataclass(frozen=True)
class RequestContext:
    """Who is asking, how urgently, and until when (``deadline`` and ``expires`` in epoch seconds).

    ``expires`` and ``signature`` are set by ``ContextSigner.sign``; a context without them is refused by
    every service."""

    request_id: str = ""
    tenant: str = ""
    cache_namespace: str = DEFAULT_NAMESPACE
    priority: int = 0
    weight: float = 1.0  # the tenant's fair share of the decoder within its priority class
    max_kv_share: float | None = None  # the fraction of the decoder's KV blocks its requests may hold
    deadline: float | None = None
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context of the caller's span
    expires: float = 0.0
    signature: bytes = b""

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def signed_fields(self) -> bytes:
        """The bytes the signature covers: each field length-prefixed, so no two contexts share them."""
        parts = [
            self.request_id,
            self.tenant,
            self.cache_namespace,
            str(int(self.priority)),
            repr(float(self.weight)),
            "" if self.max_kv_share is None else repr(float(self.max_kv_share)),
            str(_ms(self.deadline)),
            str(_ms(self.expires)),
        ]
        out = [_DOMAIN]
        for p in parts:
            b = p.encode("utf-8", "surrogatepass")
            out.append(b"%d:" % len(b) + b)
        return b"\n".join(out)


def _ms(t: float | None) -> int:
    """Epoch seconds as whole milliseconds, the precision the wire carries (0: none)."""
    return round(t * 1000) if t else 0


class ContextSigner:
    """Signs contexts (the gateway) and verifies them (every service) with the mesh secret."""

    def __init__(self, secret: bytes, *, ttl_s: float = 60.0, skew_s: float = 30.0, service: str = ""):
        if len(secret) < MIN_SECRET_BYTES:
            raise FailedPrecondition(
                f"the mesh secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}",
                reason="mesh_secret_too_short",
            )
        self._secret = secret
        self.service = service  # names the verifier in audit events
        self.ttl_s = ttl_s
        self.skew_s = skew_s

    @classmethod
    def from_env(cls, env_name: str = MESH_SECRET_ENV, environ: Mapping[str, str] | None = None, **kwargs):
        """The signer of the secret in ``env_name`` (an entry point's job: nothing below one reads the
        environment). A missing or short secret stops the service from starting, naming the variable."""
        import os

        value = (os.environ if environ is None else environ).get(env_name, "")
        if not value:
            raise FailedPrecondition(
                f"the mesh secret is not set: put {MIN_SECRET_BYTES}+ random bytes in the environment "
                f"variable {env_name} of every node (the chart's mesh Secret; `internvl-mesh serve` makes "
                "one for its own local Ray)",
                reason="mesh_secret_missing",
            )
        return cls(value.encode("utf-8"), **kwargs)

    @staticmethod
    def new_secret() -> str:
        return secrets.token_urlsafe(48)

    def sign(self, ctx: RequestContext, *, now: float | None = None) -> RequestContext:
        now = time.time() if now is None else now
        deadline = _ms(ctx.deadline) / 1000 if ctx.deadline else None
        unsigned = replace(ctx, deadline=deadline, expires=_ms(now + self.ttl_s) / 1000, signature=b"")
        return replace(unsigned, signature=self._mac(unsigned))

    def verify(self, ctx: RequestContext | None, *, now: float | None = None) -> RequestContext:
        """``ctx`` if its signature is valid and unexpired; UNAUTHENTICATED otherwise, with a
        ``context_refused`` audit event (the claimed tenant and request id are the caller's words)."""
        try:
            return self._verified(ctx, time.time() if now is None else now)
        except Unauthenticated as exc:
            audit_event(
                "context_refused",
                service=self.service or None,
                reason=exc.reason,
                claimed_tenant=(ctx.tenant[:64] if ctx is not None else None) or None,
                request_id=(ctx.request_id[:64] if ctx is not None else None) or None,
            )
            raise

    def _verified(self, ctx: RequestContext | None, now: float) -> RequestContext:
        if ctx is None or not ctx.signature:
            raise Unauthenticated(
                "the request context is not signed; internal services are reached through the gateway",
                reason="context_unsigned",
            )
        if not hmac.compare_digest(ctx.signature, self._mac(ctx)):
            raise Unauthenticated("the request context's signature is not valid", reason="context_invalid")
        if ctx.expires < now - self.skew_s:
            raise Unauthenticated("the request context has expired", reason="context_expired")
        if ctx.expires > now + self.ttl_s + self.skew_s:
            raise Unauthenticated("the request context expires too late", reason="context_invalid")
        if abs(ctx.priority) > MAX_PRIORITY:  # only a signer with a bug gets here
            raise Unauthenticated("the request context's priority is out of range", reason="context_invalid")
        if not _scheduling_in_range(ctx):  # only a signer with a bug gets here
            raise Unauthenticated(
                "the request context's weight or max_kv_share is out of range", reason="context_invalid"
            )
        return ctx

    def _mac(self, ctx: RequestContext) -> bytes:
        return hmac.new(self._secret, ctx.signed_fields(), hashlib.sha256).digest()


def _scheduling_in_range(ctx: RequestContext) -> bool:
    weight, share = ctx.weight, ctx.max_kv_share
    if not (isinstance(weight, int | float) and math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
        return False
    return share is None or (isinstance(share, int | float) and 0.0 < share <= 1.0)
