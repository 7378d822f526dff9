"""Fixtures of the operations suite: Redis db 13 under a stream/prefix unique to this run (deleted at the
end), tenants files with an HMAC secret, and a log check that runs after every test of the suite.

Every API key and HMAC secret a test makes is registered in ``SECRETS``; the autouse ``no_secret_logged``
captures all log records (root logger, DEBUG) of each test and fails it if one of them appears in a
formatted line, its arguments or its structured extras.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import yaml

from tests.gateway.conftest import cores  # noqa: F401 - the shared in-process encoder and decoder
from tests.support.own_redis import suite_redis

REDIS_URL = "redis://127.0.0.1:6379/13"
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


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, f"ivm:test:{RUN}:*") as client:
        yield client


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


@pytest.fixture(autouse=True)
def no_secret_logged(caplog):
    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates
    yield
    for record in [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]:
        text = " ".join(
            [
                record.getMessage(),
                repr(record.args),
                repr(getattr(record, "audit", "")),
                record.exc_text or "",
            ]
        )
        for secret in SECRETS:
            assert secret not in text, (
                f"a secret appears in a log line of {record.name}: {record.getMessage()}"
            )


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

    async def info(self):
        return await self.inner.info()
