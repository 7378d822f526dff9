"""Fixtures of the operations suite: its Redis db under a stream/prefix unique to this run (deleted at
the end; see ``helpers``), and a log check that runs after every test of the suite.

The autouse ``no_secret_logged`` captures all log records (root logger, DEBUG) of each test and fails
it if one of the ``SECRETS`` appears in a formatted line, its arguments or its structured extras.
"""

from __future__ import annotations

import logging

import pytest

from tests.gateway.ops.helpers import REDIS_URL, RUN, SECRETS
from tests.support.shared_redis import suite_redis


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, f"ivm:test:{RUN}:*") as client:
        yield client


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
