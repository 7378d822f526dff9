"""What the operations suite's tests share: its Redis (db 13) and the run's stream names, tenants files
with an HMAC secret, API keys registered as secrets no log line may contain, and a counting decoder.

Every API key and HMAC secret a test makes is registered in ``SECRETS``; the suite's autouse
``no_secret_logged`` fixture fails a test that logs one of them.
"""

from __future__ import annotations

import uuid

import yaml

from tests.support.shared_redis import redis_url

REDIS_URL = redis_url("gateway.ops")
RUN = uuid.uuid4().hex[:8]
HMAC_ENV = "IVM_TEST_KEY_HMAC"
HMAC_SECRET = f"hmac-secret-{uuid.uuid4().hex}"
SECRETS: set[str] = {HMAC_SECRET}


def remember(key: str) -> str:
    """Register a plain key (and its secret part) as something no log line may contain."""
    SECRETS.add(key)
    # ivm-<key_id>-<secret>: the secret is everything after the second dash (token_urlsafe may itself
    # contain dashes). Short fragments would match ordinary words, so only a real secret part counts.
    parts = key.split("-", 2)
    if key.startswith("ivm-") and len(parts) == 3 and len(parts[2]) >= 16:
        SECRETS.add(parts[2])
    return key


def env(name: str) -> str | None:
    return HMAC_SECRET if name == HMAC_ENV else None


def stream_name(what: str) -> str:
    return f"ivm:test:{RUN}:{what}:{uuid.uuid4().hex[:6]}"


def write_tenants(path, tenants: list[dict], keys: list) -> None:
    doc = {
        "hmac_secret_env": HMAC_ENV,
        "tenants": tenants,
        "keys": [e.model_dump(mode="json", exclude_none=True) for e in keys],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def new_key(tenant: str, **kwargs):
    from gateway.tenancy.keys import create_key

    plain, entry = create_key(tenant, hmac_secret=HMAC_SECRET.encode(), **kwargs)
    return remember(plain), entry


class CountingDecoder:
    """Wraps a decoder client and counts the tokens it hands the gateway, per request id."""

    def __init__(self, inner):
        self.inner = inner
        self.generated: dict[str, int] = {}

    async def generate(self, request, refs, ctx):
        async for event in self.inner.generate(request, refs, ctx):
            n = len(event.token_ids)
            self.generated[ctx.request_id] = self.generated.get(ctx.request_id, 0) + n
            yield event

    async def count_tokens(self, messages, image_tiles, ctx):
        return await self.inner.count_tokens(messages, image_tiles, ctx)

    async def info(self):
        return await self.inner.info()
