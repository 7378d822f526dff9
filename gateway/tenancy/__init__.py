"""Tenancy of the gateway: who is calling (API keys → tenants) and how much they may use (limits).

The gateway's request path uses it in this order::

    keys = KeyStore(path_or_None)                      # entry point; env defaults to os.environ.get
    await keys.start()                                 # reloads the file every 2 s (no-op single-tenant)
    limiter = FallbackLimiter(RedisLimiter.from_url(url), LocalLimiter.for_replicas(max_replicas))

    principal = keys.authenticate(api_key)             # Unauthenticated → 401 / UNAUTHENTICATED
    principal.require("chat")                          # PermissionDenied → 403 / PERMISSION_DENIED
    tenant = principal.tenant
    tenant.allows_model(model)                         # False → 404 / NOT_FOUND, as an unknown model
    max_tokens = tenant.max_tokens(requested, context=model_len, default=512)
                                                       # InvalidArgument → 400 / INVALID_ARGUMENT
    tenant.check_request_size(images=n, tiles=t)       # InvalidArgument → 400 / INVALID_ARGUMENT
    admission = await limiter.admit(tenant, prompt_tokens + max_tokens)
                                                       # ResourceExhausted(retry_after) → 429 / RESOURCE_EXHAUSTED
                                                       # Unavailable (fail-closed, Redis down) → 503 / UNAVAILABLE
    try:
        ...  # tenant.priority goes to the encoder and the decoder; tenant.cache_namespace to the cache
        await admission.complete(prompt_tokens + generated_tokens)   # refunds the unused reservation
    finally:
        await admission.release()                      # no-op after complete(); frees the slot otherwise

Modules:

- ``config``: the tenants file's models (``TenantsFile``, ``Tenant``, ``TenantLimits``, ``ApiKeyEntry``)
  and the scopes a key may hold (``SCOPES``: chat, tile, embed, decode);
- ``keys``: ``KeyStore`` (authentication into a ``Principal``, live reload, single-tenant mode), the
  ``Authenticator`` protocol it satisfies, ``create_key``, ``key_digest``;
- ``limiter``: ``Admission``, ``RedisLimiter``, ``LocalLimiter``, ``FallbackLimiter``.

Secrets: the file stores digests only; the HMAC secret's *name* is in the file and its value comes from
the ``env`` callable given to ``KeyStore`` (``os.environ.get`` unless the caller passes another), which
is the only place this package touches the environment.
"""

from gateway.tenancy.config import SCOPES, ApiKeyEntry, Tenant, TenantLimits, TenantsFile, parse_key_id
from gateway.tenancy.keys import (
    DEFAULT_TENANT,
    Authenticator,
    KeyStore,
    Principal,
    create_key,
    default_tenant,
    key_digest,
)
from gateway.tenancy.limiter import (
    REASON_CONCURRENCY,
    REASON_DAILY,
    REASON_RATE,
    REASON_TOKENS,
    Admission,
    FallbackLimiter,
    Limiter,
    LocalLimiter,
    RedisLimiter,
)

__all__ = [
    "DEFAULT_TENANT",
    "REASON_CONCURRENCY",
    "REASON_DAILY",
    "REASON_RATE",
    "REASON_TOKENS",
    "SCOPES",
    "Admission",
    "ApiKeyEntry",
    "Authenticator",
    "FallbackLimiter",
    "KeyStore",
    "Limiter",
    "LocalLimiter",
    "Principal",
    "RedisLimiter",
    "Tenant",
    "TenantLimits",
    "TenantsFile",
    "create_key",
    "default_tenant",
    "key_digest",
    "parse_key_id",
]
