"""Operating the gateway over real HTTP (real encoder and decoder cores, the suite's real Redis db):
usage records equal the responses' usage (plain, streamed, cancelled), keys change without a restart
(revoke, rotate, add), and the audit log says what happened, naming keys by id only."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from gateway.audit import AUDIT_LOGGER
from gateway.tenancy import REASON_RATE
from mesh import ops_cli
from tests.gateway.ops.helpers import (
    REDIS_URL,
    CountingDecoder,
    env,
    new_key,
    remember,
    stream_name,
    write_tenants,
)
from tests.support.gateway import MODEL, UvicornThread, reload_keys_while_serving
from tests.support.gateway import chat_body as _body
from tests.support.images import png
from tests.support.signing import SIGNER

RELOAD_S = 0.3
GENEROUS = {"requests_per_s": 1000, "max_concurrent": 64}


@pytest.fixture(scope="module")
def ops(cores, tmp_path_factory, sync_redis):
    from prometheus_client import CollectorRegistry

    from gateway.audit import AuditedKeyStore, AuditLog
    from gateway.core import Gateway, GatewayLimits, ModelRoute
    from gateway.http_api import create_http_app
    from gateway.metrics import GatewayMetrics
    from gateway.ops_config import OpsSettings
    from gateway.tenancy.limiter import LocalLimiter
    from gateway.usage import UsageRecorder
    from mesh.local_clients import LocalDecoderClient, LocalEncoderClient

    workdir = tmp_path_factory.mktemp("ops")
    path = workdir / "tenants.yaml"
    alpha, alpha_entry = new_key("alpha", key_id="alpha1")
    slow, slow_entry = new_key("slow", key_id="slow1")
    write_tenants(
        path,
        [
            {"name": "alpha", "limits": GENEROUS},
            {"name": "beta", "limits": GENEROUS},
            {"name": "slow", "limits": {"requests_per_s": 0.1, "burst": 1}},
        ],
        [alpha_entry, slow_entry],
    )
    settings = OpsSettings.model_validate(
        {
            "usage": {"stream": stream_name("usage"), "jsonl_path": str(workdir / "usage.jsonl")},
            "metrics": {"tenant_labels": ["alpha"]},
        }
    )
    registry = CollectorRegistry()
    audit = AuditLog()
    keys = AuditedKeyStore(path, audit=audit, env=env, reload_interval_s=RELOAD_S)
    recorder = UsageRecorder.from_url(settings.usage, REDIS_URL, registry=registry).start()
    decoder = CountingDecoder(LocalDecoderClient(cores["frontend"]))
    route = ModelRoute(
        MODEL, LocalEncoderClient(cores["encoder"]), decoder, 12, cores["decoder"].max_model_len
    )
    metrics = GatewayMetrics(registry, tenant_labels=settings.metrics.tenant_labels)
    gateway = Gateway(
        [route],
        keys,
        LocalLimiter(),
        GatewayLimits(default_timeout_s=60),
        [metrics, audit, recorder],
        signer=SIGNER,
    )
    app = create_http_app(gateway)
    reload_keys_while_serving(app, keys)
    with UvicornThread(app) as server:
        yield {
            "url": server.base_url,
            "path": path,
            "keys": {"alpha": alpha, "slow": slow},
            "store": keys,
            "recorder": recorder,
            "decoder": decoder,
            "registry": registry,
            "settings": settings,
            "redis": sync_redis,
        }
    recorder.close()


def _post(ops, key, body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(ops["url"] + "/chat/completions", json=body, headers=headers, timeout=60)


def _stream_records(ops) -> dict[str, dict]:
    from gateway.usage import UsageRecord

    entries = ops["redis"].xrange(ops["settings"].usage.stream)
    return {r.request_id: r for r in (UsageRecord.from_fields(data) for _, data in entries)}


def _record(ops, request_id, timeout=15.0):
    """The usage record of ``request_id`` from the stream, checked against the JSONL copy."""
    from gateway.usage import read_jsonl

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops["recorder"].flush(5)
        found = _stream_records(ops).get(request_id)
        if found is not None:
            jsonl = {r.request_id: r for r in read_jsonl(ops["settings"].usage.jsonl_path, since=0)}
            assert jsonl[request_id] == found
            return found
        time.sleep(0.05)
    raise AssertionError(f"no usage record for {request_id}")


def _assert_usage_equal(record, usage):
    assert record.prompt_tokens == usage["prompt_tokens"]
    assert record.completion_tokens == usage["completion_tokens"]
    assert record.total_tokens == usage["total_tokens"]
    assert record.image_tokens == usage["prompt_tokens_details"]["image_tokens"]


def _image_body(img: bytes, **extra):
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is it?"}]
    return _body(content=content, max_tokens=6, **extra)


# -- usage records --------------------------------------------------------------------------------------
def test_usage_record_equals_the_response_usage(ops):
    r = _post(ops, ops["keys"]["alpha"], _image_body(png(900, 450, seed=3)))
    assert r.status_code == 200
    body = r.json()
    record = _record(ops, body["id"])
    _assert_usage_equal(record, body["usage"])
    assert (record.tenant, record.model, record.status) == ("alpha", MODEL, "ok")
    assert record.images == 1 and record.tiles == 3 and record.image_tokens == 3 * 256
    assert record.cache_hits == 0 and record.latency_s > 0 and record.finish_reason == "length"
    again = _post(ops, ops["keys"]["alpha"], _image_body(png(900, 450, seed=3))).json()
    assert _record(ops, again["id"]).cache_hits == 1


def test_streamed_usage_record_equals_the_final_usage_chunk(ops):
    usage, request_id = None, None
    with httpx.stream(
        "POST",
        ops["url"] + "/chat/completions",
        json=_body(max_tokens=7, stream=True, stream_options={"include_usage": True}),
        headers={"authorization": f"Bearer {ops['keys']['alpha']}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                request_id = event["id"]
                usage = event.get("usage") or usage
    record = _record(ops, request_id)
    _assert_usage_equal(record, usage)
    assert record.status == "ok" and usage["completion_tokens"] > 0


def test_cancelled_stream_records_its_prompt_and_the_tokens_generated_until_then(ops):
    seen_tokens, request_id = 0, None
    with httpx.stream(
        "POST",
        ops["url"] + "/chat/completions",
        json=_body(max_tokens=2000, stream=True, logprobs=True),
        headers={"authorization": f"Bearer {ops['keys']['alpha']}"},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        while seen_tokens < 5:
            line = next(lines)
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                request_id = event["id"]
                for choice in event["choices"]:
                    seen_tokens += len((choice.get("logprobs") or {}).get("content") or [])
    # The client is gone: the gateway closes the generation, then records it.
    record = _record(ops, request_id)
    assert record.status == "cancelled" and record.finish_reason == ""
    generated = ops["decoder"].generated[request_id]
    assert record.completion_tokens == generated
    assert seen_tokens <= generated < 2000
    # the prompt is accounted for too: what the same prompt costs in a request that finishes
    finished = _post(ops, ops["keys"]["alpha"], _body(max_tokens=1)).json()["usage"]
    assert record.prompt_tokens == finished["prompt_tokens"] > 0
    assert record.total_tokens == finished["prompt_tokens"] + generated


def test_usage_command_summarises_the_stream_and_the_file(ops):
    from typer.testing import CliRunner

    from mesh.cli import _register_optional_commands, app

    _register_optional_commands()
    for _ in range(2):
        assert _post(ops, ops["keys"]["alpha"], _body(max_tokens=3)).status_code == 200
    ops["recorder"].flush(5)
    records = [r for r in _stream_records(ops).values() if r.tenant == "alpha"]
    want = sum(r.total_tokens for r in records)
    runner = CliRunner()
    stream = ops["settings"].usage.stream
    for source in (
        ["--redis-url", REDIS_URL, "--stream", stream],
        ["--jsonl", ops["settings"].usage.jsonl_path],
    ):
        out = runner.invoke(app, ["usage", "--tenant", "alpha", "--since", "1h", "--json", *source])
        assert out.exit_code == 0, out.output
        (row,) = json.loads(out.stdout)["rows"]
        assert (row["tenant"], row["requests"], row["total_tokens"]) == ("alpha", len(records), want)
    out = runner.invoke(app, ["usage", "--since", "1h", "--redis-url", REDIS_URL, "--stream", stream])
    assert out.exit_code == 0 and "alpha" in out.stdout and "completion_tokens".upper() in out.stdout


def test_billing_reads_records_through_its_consumer_group(ops):
    r = _post(ops, ops["keys"]["alpha"], _body(max_tokens=2))
    ops["recorder"].flush(5)
    stream = ops["settings"].usage.stream
    got = ops["redis"].xreadgroup("billing", "worker-1", {stream: ">"}, count=10_000)
    (name, entries) = got[0]
    ids = {data[b"request_id"].decode(): entry_id for entry_id, data in entries}
    assert r.json()["id"] in ids
    assert ops["redis"].xack(stream, "billing", *ids.values()) == len(ids)


def test_tenant_metrics_use_the_allow_list(ops):
    _post(ops, ops["keys"]["alpha"], _body(max_tokens=2))
    text = _metrics(ops)
    assert 'tenant="alpha"' in text
    assert 'tenant="slow"' not in text


def _metrics(ops) -> str:
    from prometheus_client import generate_latest

    return generate_latest(ops["registry"]).decode()


# -- keys and audit ---------------------------------------------------------------------------------------
def _audit(caplog) -> list[dict]:
    return [r.audit for r in caplog.records if r.name == AUDIT_LOGGER]


def _wait_status(ops, key, status, timeout):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _post(ops, key, _body(max_tokens=1)).status_code == status:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"key did not reach HTTP {status} within {timeout} s")


def test_revoked_key_is_refused_within_the_reload_interval(ops, caplog):
    path = ops["path"]
    doc = ops_cli.load_doc(path)
    plain = remember(
        ops_cli.add_key(
            doc, "beta", hmac_secret=env("IVM_TEST_KEY_HMAC").encode(), key_id="beta1", now=datetime.now(UTC)
        )
    )
    ops_cli.write_doc(path, doc)
    _wait_status(ops, plain, 200, timeout=RELOAD_S + 2)
    doc = ops_cli.load_doc(path)
    ops_cli.revoke_key(doc, "beta1")
    ops_cli.write_doc(path, doc)
    waited = _wait_status(ops, plain, 401, timeout=5)
    assert waited <= RELOAD_S + 1.0, f"refused only after {waited:.2f} s"
    r = _post(ops, plain, _body())
    assert r.json()["error"]["code"] == "key_revoked"
    events = _audit(caplog)
    assert {"event": "key_added", "key_id": "beta1", "tenant": "beta"} in events
    assert {"event": "key_revoked", "key_id": "beta1", "tenant": "beta"} in events
    assert {"event": "auth_failure", "key_id": "beta1", "reason": "key_revoked"} in events


def test_rotated_pair_both_work_during_the_window(ops, caplog):
    path = ops["path"]
    old = ops["keys"]["alpha"]
    doc = ops_cli.load_doc(path)
    now = datetime.now(UTC).replace(microsecond=0)
    window = timedelta(seconds=3)
    new, old_ids = ops_cli.rotate_key(
        doc, "alpha", window=window, hmac_secret=env("IVM_TEST_KEY_HMAC").encode(), now=now
    )
    remember(new)
    ops_cli.write_doc(path, doc)
    assert old_ids == ["alpha1"]
    _wait_status(ops, new, 200, timeout=RELOAD_S + 2)
    assert _post(ops, old, _body(max_tokens=1)).status_code == 200  # both during the window
    end = now + window
    time.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()) + 0.1)
    r = _post(ops, old, _body(max_tokens=1))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_expired"
    assert _post(ops, new, _body(max_tokens=1)).status_code == 200
    ops["keys"]["alpha"] = new
    events = _audit(caplog)
    assert any(e["event"] == "key_expiry_changed" and e["key_id"] == "alpha1" for e in events)
    assert any(e["event"] == "key_added" and e["tenant"] == "alpha" for e in events)
    assert {"event": "auth_failure", "key_id": "alpha1", "reason": "key_expired"} in events


def test_audit_log_names_failures_and_rejections_without_secrets(ops, caplog):
    unknown = remember("ivm-nosuchkey-" + "x" * 43)
    assert _post(ops, unknown, _body()).status_code == 401
    assert _post(ops, None, _body()).status_code == 401
    assert _post(ops, remember("not-an-ivm-key-at-all"), _body()).status_code == 401
    slow = ops["keys"]["slow"]
    statuses = [_post(ops, slow, _body(max_tokens=1)).status_code for _ in range(2)]
    assert statuses == [200, 429]
    events = _audit(caplog)
    assert {"event": "auth_failure", "key_id": "nosuchkey", "reason": "invalid_api_key"} in events
    assert {"event": "auth_failure", "key_id": "none", "reason": "missing_api_key"} in events
    assert {"event": "auth_failure", "key_id": "none", "reason": "invalid_api_key"} in events
    assert {"event": "limit_rejected", "reason": REASON_RATE, "tenant": "slow"} in events
    # The rejected request is still one usage record, with its reason as status and no tokens.
    ops["recorder"].flush(5)
    rejected = [r for r in _stream_records(ops).values() if r.tenant == "slow" and r.status == REASON_RATE]
    assert len(rejected) == 1 and rejected[0].total_tokens == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("nosuchkey" in line for line in lines)  # the check below has something to look at
    assert logging.getLogger(AUDIT_LOGGER).isEnabledFor(logging.INFO)
