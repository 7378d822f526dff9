"""Usage records: one per finished request, for billing, written without ever slowing a request down.

``UsageRecorder`` is a ``GatewayObserver``. ``on_complete`` only appends to an in-memory buffer; a
writer thread appends the records to a Redis stream (``XADD MAXLEN ~``, bounded) and, optionally, to a
JSONL file. The thread owns every blocking call, so a slow or dead Redis never touches the event loop;
while Redis is unreachable the records wait in a bounded buffer and the writer retries with backoff. A
full buffer drops the oldest records, and every drop is counted (``dropped``, and the
``internvl_mesh_usage_records_dropped_total`` counter) and logged once per outage: a billing gap must be
visible, but losing a record is better than failing the request it describes.

Delivery is at least once: a write that fails half-way is retried whole, so consumers deduplicate on
``request_id``. Consumers read the stream through consumer groups (``XREADGROUP`` … ``XACK``); the
recorder creates the configured groups from the stream's beginning, so a group never misses records
written before its first reader started.

A record carries the usage the client was told: ``prompt_tokens`` (image tokens included),
``image_tokens`` and ``completion_tokens`` as in the response's ``usage``. A cancelled request (client
gone mid-stream) has status ``cancelled``, its prompt's tokens and the completion tokens generated up to
then. ``operation`` says what was called: ``chat``, or an internal call through the gateway (``tile``,
``embed`` — billed by ``tiles`` —, ``decode`` — billed by tokens —, ``count_tokens``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from gateway.core import RequestRecord
from gateway.ops_config import UsageSettings
from services.common.refs import DEFAULT_KEY_PREFIX

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_BACKOFF_S = 30.0
WRITE_BATCH = 500
DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class UsageRecord:
    """One finished request as billing sees it. ``ts`` is the Unix time it finished."""

    request_id: str
    tenant: str
    model: str
    status: str
    ts: float
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    tiles: int = 0
    cache_hits: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    queue_s: float = 0.0
    finish_reason: str = ""
    operation: str = "chat"
    v: int = SCHEMA_VERSION

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_request(cls, r: RequestRecord, ts: float) -> UsageRecord:
        return cls(
            request_id=r.request_id,
            tenant=r.tenant,
            model=r.model,
            status=r.status,
            ts=round(ts, 3),
            prompt_tokens=r.prompt_tokens,
            image_tokens=r.image_tokens,
            completion_tokens=r.completion_tokens,
            images=r.images,
            tiles=r.tiles,
            cache_hits=r.cache_hits,
            latency_s=round(r.latency_s, 6),
            ttft_s=round(r.ttft_s, 6) if r.ttft_s is not None else None,
            queue_s=round(r.queue_s, 6),
            finish_reason=r.finish_reason,
            operation=r.operation,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def to_fields(self) -> dict[str, str]:
        """Flat string fields of a stream entry (an absent ``ttft_s`` is an empty string)."""
        return {k: "" if v is None else str(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_fields(cls, data: Mapping[Any, Any]) -> UsageRecord:
        """From a stream entry's fields (bytes or str) or a JSON object; unknown fields are ignored."""
        raw = {_text(k): _text(v) if isinstance(v, bytes) else v for k, v in data.items()}
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name == "ttft_s":
                out[f.name] = float(value) if value not in ("", None) else None
            elif f.type in ("int", int):
                out[f.name] = int(value)
            elif f.type in ("float", float):
                out[f.name] = float(value)
            else:
                out[f.name] = str(value)
        return cls(**out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class UsageRecorder:
    """The ``GatewayObserver`` that writes usage records (see the module docstring).

    ``redis`` is a synchronous ``redis.Redis`` (or None: JSONL only). The stream is
    ``settings.stream_key(key_prefix)`` (``redis.key_prefix``: ``<prefix>:usage`` by default). ``start()``
    starts the writer thread; ``close()`` writes what is buffered (bounded by ``timeout``) and stops it.
    """

    def __init__(
        self,
        settings: UsageSettings,
        redis: Any | None = None,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        registry: CollectorRegistry | None = REGISTRY,
        clock=time.time,
    ):
        self.settings = settings
        self.stream = settings.stream_key(key_prefix)
        self.redis = redis
        self.jsonl_path = Path(settings.jsonl_path) if settings.jsonl_path else None
        self.written = 0
        self.dropped = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._inbox: deque[UsageRecord] = deque()
        self._pending: deque[UsageRecord] = deque()  # waiting for Redis
        self._stop = False
        self._thread: threading.Thread | None = None
        self._groups_ready = False
        self._retry_at = 0.0
        self._backoff = settings.flush_interval_s
        self._outage: str | None = None
        self._jsonl_error: str | None = None
        self._drop_logged = -DROP_LOG_INTERVAL_S
        self._m_written = self._m_dropped = self._m_buffered = None
        if registry is not None:
            self._m_written = Counter(
                "internvl_mesh_usage_records_written",
                "Usage records written, by sink.",
                ["sink"],
                registry=registry,
            )
            self._m_dropped = Counter(
                "internvl_mesh_usage_records_dropped",
                "Usage records lost, by sink and reason (a billing gap).",
                ["sink", "reason"],
                registry=registry,
            )
            self._m_buffered = Gauge(
                "internvl_mesh_usage_records_buffered",
                "Usage records waiting to be written.",
                registry=registry,
            )

    @classmethod
    def from_url(
        cls, settings: UsageSettings, redis_url: str, *, max_connections: int | None = None, **kwargs: Any
    ) -> UsageRecorder:
        """A recorder writing to the Redis at ``redis_url`` (empty: JSONL only); ``max_connections``
        bounds its connection pool (None: redis-py's default)."""
        client = None
        if redis_url:
            import redis

            client = redis.Redis.from_url(
                redis_url,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
                max_connections=max_connections,
            )
        return cls(settings, client, **kwargs)

    # -- observer -------------------------------------------------------------------------------
    def on_complete(self, record: RequestRecord) -> None:
        usage = UsageRecord.from_request(record, self._clock())
        with self._lock:
            if len(self._inbox) >= self.settings.buffer_records:
                self._inbox.popleft()
                self._count_drop("all", "buffer_full", 1)
            self._inbox.append(usage)
            self._idle.clear()
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> UsageRecorder:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="usage-recorder", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record so far is written (or dropped); False if that took over ``timeout``."""
        self._wake.set()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self._pending)

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # the writer must survive anything; the next tick tries again
                log.exception("usage recorder: unexpected error")

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._inbox)
            self._inbox.clear()
        if batch and self.jsonl_path is not None:
            self._write_jsonl(batch)
        if self.redis is not None:
            with self._lock:
                self._pending.extend(batch)
                overflow = len(self._pending) - self.settings.buffer_records
                for _ in range(max(0, overflow)):
                    self._pending.popleft()
                if overflow > 0:
                    self._count_drop("redis", "buffer_full", overflow)
            if self._pending and time.monotonic() >= self._retry_at:
                self._write_redis()
        with self._lock:
            left = len(self._inbox) + len(self._pending)
            if self._m_buffered is not None:
                self._m_buffered.set(left)
            if not self._inbox and (not self._pending or self._outage is not None):
                # Nothing more can be done now: flush() waiters return (records may stay buffered
                # during an outage; ``buffered`` says how many).
                self._idle.set()

    def _write_jsonl(self, batch: list[UsageRecord]) -> None:
        try:
            with self.jsonl_path.open("a", encoding="utf-8") as f:
                f.write("".join(r.to_json() + "\n" for r in batch))
        except OSError as exc:
            message = f"{type(exc).__name__}: {exc.strerror or exc}"
            if message != self._jsonl_error:
                log.error("usage records: cannot append to %s (%s); records lost", self.jsonl_path, message)
            self._jsonl_error = message
            self._count_drop("jsonl", "write_error", len(batch))
            return
        self._jsonl_error = None
        if self._m_written is not None:
            self._m_written.labels("jsonl").inc(len(batch))
        if self.redis is None:
            self.written += len(batch)

    def _write_redis(self) -> None:
        from redis.exceptions import RedisError

        s = self.settings
        try:
            if not self._groups_ready:
                self._ensure_groups()
            while True:
                with self._lock:
                    batch = [self._pending[i] for i in range(min(WRITE_BATCH, len(self._pending)))]
                if not batch:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for r in batch:
                    pipe.xadd(self.stream, r.to_fields(), maxlen=s.max_len, approximate=True)
                pipe.execute()
                with self._lock:
                    for _ in batch:
                        self._pending.popleft()
                self.written += len(batch)
                if self._m_written is not None:
                    self._m_written.labels("redis").inc(len(batch))
        except (RedisError, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            if self._outage is None:
                log.error(
                    "usage records: Redis stream %s unreachable (%s); buffering up to %d records",
                    self.stream,
                    message,
                    s.buffer_records,
                )
            self._outage = message
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            return
        if self._outage is not None:
            log.warning("usage records: Redis stream %s reachable again", self.stream)
        self._outage = None
        self._backoff = s.flush_interval_s

    def _ensure_groups(self) -> None:
        from redis.exceptions import ResponseError

        for group in self.settings.consumer_groups:
            try:
                self.redis.xgroup_create(self.stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def _count_drop(self, sink: str, reason: str, n: int) -> None:
        self.dropped += n
        if self._m_dropped is not None:
            self._m_dropped.labels(sink, reason).inc(n)
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_INTERVAL_S:  # one line per interval, not one per record
            self._drop_logged = now
            log.warning("usage records dropped (%s, %s): %d so far", sink, reason, self.dropped)


# -- reading -------------------------------------------------------------------------------------
def read_stream(
    client: Any,
    stream: str,
    *,
    since: float,
    until: float | None = None,
    tenant: str | None = None,
    page: int = 1000,
) -> Iterator[UsageRecord]:
    """Records of ``stream`` that finished in [since, until), oldest first (``XRANGE``, paged).

    Entry ids are the time of the write, never before the request finished, so the range starts at
    ``since``; a record buffered during an outage is written later and filtered by its own ``ts``.
    """
    start = f"{int(since * 1000)}-0"
    while True:
        entries = client.xrange(stream, min=start, max="+", count=page)
        for _entry_id, data in entries:
            record = UsageRecord.from_fields(data)
            if _selected(record, since, until, tenant):
                yield record
        if len(entries) < page:
            return
        last = _text(entries[-1][0])
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


def read_jsonl(
    path: str | Path, *, since: float, until: float | None = None, tenant: str | None = None
) -> Iterator[UsageRecord]:
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = UsageRecord.from_fields(json.loads(line))
                if _selected(record, since, until, tenant):
                    yield record


def _selected(r: UsageRecord, since: float, until: float | None, tenant: str | None) -> bool:
    return r.ts >= since and (until is None or r.ts < until) and (tenant is None or r.tenant == tenant)


@dataclass
class UsageTotals:
    """Sums over records; ``requests_by_status`` counts every status (ok, cancelled, rate, ...)."""

    requests: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    tiles: int = 0
    cache_hits: int = 0
    requests_by_status: dict[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.image_tokens += r.image_tokens
        self.completion_tokens += r.completion_tokens
        self.images += r.images
        self.tiles += r.tiles
        self.cache_hits += r.cache_hits
        self.requests_by_status[r.status] = self.requests_by_status.get(r.status, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def summarise(records: Iterable[UsageRecord]) -> dict[tuple[str, str], UsageTotals]:
    """Totals per (tenant, model), counting each ``request_id`` once (delivery is at least once)."""
    seen: set[str] = set()
    out: dict[tuple[str, str], UsageTotals] = {}
    for r in records:
        if r.request_id in seen:
            continue
        seen.add(r.request_id)
        out.setdefault((r.tenant, r.model), UsageTotals()).add(r)
    return out
