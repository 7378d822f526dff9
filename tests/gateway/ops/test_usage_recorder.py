"""The usage recorder without the gateway: a dead Redis never blocks or fails on_complete, the buffer is
bounded and drops are counted, the file keeps every record, the stream is bounded (MAXLEN ~)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from gateway.core import RequestRecord
from gateway.ops_config import UsageSettings
from gateway.usage import UsageRecord, UsageRecorder, read_jsonl, read_stream, summarise
from tests.gateway.ops.helpers import REDIS_URL, stream_name
from tests.support.ports import free_port


def _request(i: int, tenant: str = "acme", status: str = "ok") -> RequestRecord:
    r = RequestRecord(f"req-{i}", tenant, "m", started=time.monotonic(), status=status)
    r.prompt_tokens, r.image_tokens, r.completion_tokens, r.tiles, r.images = 10 + i, 4, i, 2, 1
    return r


def _dropped(registry: CollectorRegistry, **labels) -> float:
    return registry.get_sample_value("internvl_mesh_usage_records_dropped_total", labels) or 0.0


def test_redis_down_buffers_a_bounded_amount_counts_drops_and_recovers(tmp_path, sync_redis):
    registry = CollectorRegistry()
    settings = UsageSettings(
        stream=stream_name("down"),
        buffer_records=10,
        flush_interval_s=0.05,
        jsonl_path=str(tmp_path / "u.jsonl"),
    )
    dead = f"redis://127.0.0.1:{free_port()}/13"
    recorder = UsageRecorder.from_url(settings, dead, registry=registry).start()
    try:
        for i in range(15):
            recorder.on_complete(_request(i))  # returns at once: the thread owns every Redis call
            assert recorder.flush(5)  # each record reaches the file and the Redis buffer
        assert recorder.written == 0 and recorder.buffered == 10 and recorder.dropped == 5
        assert _dropped(registry, sink="redis", reason="buffer_full") == 5  # the oldest
        assert [r.request_id for r in read_jsonl(settings.jsonl_path, since=0)] == [
            f"req-{i}" for i in range(15)
        ]
        recorder.redis = UsageRecorder.from_url(settings, REDIS_URL, registry=None).redis  # Redis is back
        recorder._retry_at = 0.0
        deadline = time.monotonic() + 10
        while recorder.buffered and time.monotonic() < deadline:
            recorder.flush(1)
            time.sleep(0.05)
        assert recorder.written == 10 and recorder.buffered == 0
        got = list(read_stream(sync_redis, settings.stream, since=0))
        assert [r.request_id for r in got] == [f"req-{i}" for i in range(5, 15)]
        assert got[0] == UsageRecord.from_request(_request(5), got[0].ts)
    finally:
        recorder.close()


def test_stream_is_bounded_and_groups_exist_before_the_first_record(sync_redis):
    settings = UsageSettings(stream=stream_name("bound"), max_len=1000, consumer_groups=["billing", "audit"])
    recorder = UsageRecorder.from_url(settings, REDIS_URL, registry=None).start()
    try:
        for i in range(2500):
            recorder.on_complete(_request(i))
        assert recorder.flush(20)
    finally:
        recorder.close()
    assert recorder.written == 2500
    assert 1000 <= sync_redis.xlen(settings.stream) < 1300  # approximate trimming: whole nodes
    groups = {g["name"].decode() for g in sync_redis.xinfo_groups(settings.stream)}
    assert groups == {"billing", "audit"}


def test_summary_counts_each_request_once_and_every_status():
    records = [
        UsageRecord.from_request(_request(i, status=s), 100.0)
        for i, s in enumerate(["ok", "ok", "cancelled"])
    ]
    totals = summarise([*records, records[0]])  # at-least-once delivery: a duplicate
    t = totals[("acme", "m")]
    assert t.requests == 3 and t.requests_by_status == {"ok": 2, "cancelled": 1}
    assert t.completion_tokens == 0 + 1 + 2 and t.prompt_tokens == 10 + 11 + 12 and t.tiles == 6


def test_record_round_trips_through_stream_fields_and_json():
    r = UsageRecord.from_request(_request(3), 1234.5)
    assert UsageRecord.from_fields({k.encode(): v.encode() for k, v in r.to_fields().items()}) == r
    import json

    assert UsageRecord.from_fields(json.loads(r.to_json())) == r
    assert r.ttft_s is None and r.to_fields()["ttft_s"] == ""
