"""The signed request context: what the signature covers, how it travels, when it is refused."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest

from services.common.audit import AUDIT_LOGGER
from services.common.context import MESH_SECRET_ENV, ContextSigner, RequestContext
from services.common.errors import FailedPrecondition, Unauthenticated
from services.common.pb import context_from_pb, context_to_pb

SIGNER = ContextSigner(b"k" * 32, ttl_s=60, skew_s=30, service="decoder")
CTX = RequestContext(
    request_id="r-1",
    tenant="acme",
    cache_namespace="acme",
    priority=2,
    weight=3.0,
    max_kv_share=0.5,
    deadline=time.time() + 100.123456,
)


def _reason(ctx, **kw) -> str:
    with pytest.raises(Unauthenticated) as err:
        SIGNER.verify(ctx, **kw)
    return err.value.reason


def test_a_signed_context_verifies_after_crossing_the_wire_and_the_trace_is_not_signed():
    ctx = SIGNER.sign(CTX)
    assert SIGNER.verify(ctx) == ctx
    wire = context_from_pb(context_to_pb(replace(ctx, trace={"traceparent": "00-ab-cd-01"})))
    assert SIGNER.verify(wire).tenant == "acme" and wire.signature == ctx.signature
    assert (wire.weight, wire.max_kv_share) == (3.0, 0.5)
    plain = SIGNER.sign(RequestContext(request_id="r-3", tenant="t"))  # weight 1, no cap: the defaults
    assert SIGNER.verify(context_from_pb(context_to_pb(plain))) == plain


@pytest.mark.parametrize(
    "field,value",
    [("request_id", "r-2"), ("tenant", "other"), ("cache_namespace", "other"), ("priority", 10),
     ("weight", 100.0), ("weight", 3.0001), ("max_kv_share", None), ("max_kv_share", 1.0),
     ("deadline", CTX.deadline + 60), ("deadline", None), ("expires", time.time() + 70)],
)  # fmt: skip
def test_changing_any_signed_field_breaks_the_signature(field, value):
    assert _reason(replace(SIGNER.sign(CTX), **{field: value})) == "context_invalid"


def test_unsigned_foreign_expired_and_far_future_contexts_are_refused():
    assert _reason(CTX) == "context_unsigned"
    assert _reason(None) == "context_unsigned"
    assert _reason(ContextSigner(b"x" * 32).sign(CTX)) == "context_invalid"
    signed_then = SIGNER.sign(CTX, now=time.time() - 91)  # expired 31 s ago: beyond the 30 s skew
    assert _reason(signed_then) == "context_expired"
    assert SIGNER.verify(SIGNER.sign(CTX, now=time.time() - 89))  # within the skew
    assert _reason(ContextSigner(b"k" * 32, ttl_s=3600).sign(CTX)) == "context_invalid"
    assert _reason(SIGNER.sign(replace(CTX, priority=11))) == "context_invalid"
    for bad in ({"weight": 100.5}, {"weight": 0.0}, {"weight": float("nan")}, {"max_kv_share": 1.5}):
        assert _reason(SIGNER.sign(replace(CTX, **bad))) == "context_invalid"  # a signer with a bug


def test_a_refusal_is_an_audit_event_without_secrets(caplog):
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        _reason(replace(CTX, tenant="victim"))
    (record,) = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    event = json.loads(record.getMessage())
    assert event == {"event": "context_refused", "service": "decoder", "reason": "context_unsigned",
                     "claimed_tenant": "victim", "request_id": "r-1"}  # fmt: skip


def test_the_secret_comes_from_the_environment_and_must_be_long_enough():
    with pytest.raises(FailedPrecondition) as err:
        ContextSigner.from_env(environ={})
    assert err.value.reason == "mesh_secret_missing" and MESH_SECRET_ENV in err.value.message
    with pytest.raises(FailedPrecondition):
        ContextSigner.from_env(environ={MESH_SECRET_ENV: "short"})
    made = ContextSigner.from_env(environ={MESH_SECRET_ENV: ContextSigner.new_secret()})
    assert made.verify(made.sign(CTX))
