"""Packs the tiles of concurrent requests into shared vision forwards.

A GPU runs one 32-tile forward much faster than 32 one-tile forwards, so requests are not encoded one
by one: each ``submit`` queues a request's uint8 tiles, and one worker repeatedly

1. waits until tiles are queued, then at most ``max_wait_ms`` (counted from the oldest waiting
   request's arrival) for the queue to fill the tile budget ``max_batch_tiles``;
2. plans a batch (``fair_queue.py``): priority classes strictly first (a higher tenant priority is
   served before a lower one, up to a starvation bound ``max_wait_s``); within a class the tiles go to
   tenants in proportion to their weights (weighted fair queueing in tiles); a tenant's share of a
   forward is water-filled over its requests, smallest remainder first, so a small image finishes in
   the next forward even while a 40-tile image is being worked through (a request larger than the
   budget is split across forwards). With ``fair_share`` off: priorities, then the budget water-filled
   over every waiting request;
3. runs the forward on its one executor thread (the event loop keeps accepting requests meanwhile)
   and hands each request its rows; a request completes when all its tiles are done.

Requests whose deadline passes while queued fail with ``DeadlineExceeded``; a cancelled caller's tiles
are dropped. The queue is bounded (``max_queued_tiles``): beyond it ``submit`` is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.common.tenant_labels import TenantLabels
from services.encoder.config import BatchingConfig
from services.encoder.fair_queue import Take, TileFairShare, plan_water_fill
from services.encoder.metrics import EncoderMetrics

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class _Request:
    seq: int
    priority: int
    tiles: torch.Tensor  # (N, S, S, 3) uint8
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None
    scheduled: int = 0  # tiles handed to a forward so far
    parts: list[torch.Tensor] = field(default_factory=list)  # outputs, in tile order
    started: bool = False
    tenant: str = ""
    weight: float = 1.0  # the tenant's fair share of the tiles within its priority class
    starved: bool = False  # waited max_wait_s: planned above every priority

    @property
    def total(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def remaining(self) -> int:
        return self.total - self.scheduled


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


def plan_batch(waiting: list[_Request], budget: int) -> list[_Slice]:
    """The plan with fair share off: priorities strictly, then the budget water-filled (pure)."""
    return _slices(plan_water_fill(waiting, budget))  # type: ignore[arg-type]


def _slices(takes: list[Take]) -> list[_Slice]:
    return [_Slice(t.request, t.request.scheduled, t.request.scheduled + t.tiles) for t in takes]  # type: ignore[arg-type]


class TileBatcher:
    """``await submit(tiles) -> (N, tokens, D)``; forwards are shared between concurrent callers."""

    def __init__(
        self,
        encode_fn: EncodeFn,
        config: BatchingConfig | None = None,
        *,
        metrics: EncoderMetrics | None = None,
        model_label: str = "",
    ):
        self.encode_fn = encode_fn
        self.config = config or BatchingConfig()
        self._metrics = metrics
        self._label = model_label
        self._waiting: list[_Request] = []
        self._queued_tiles = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-forward")
        self._closed = False
        #: Recent forwards as (tiles, requests), newest last: for tests and debugging.
        self.recent_batches: deque[tuple[int, int]] = deque(maxlen=1024)
        self.forwards = 0
        self.tiles_encoded = 0
        self.policy = TileFairShare(self.config.fair_share, self.config.max_wait_s)
        self._tenant_label = TenantLabels(self.config.tenant_labels)

    @property
    def queued_tiles(self) -> int:
        return self._queued_tiles

    async def submit(
        self,
        tiles: torch.Tensor,
        priority: int = 0,
        deadline: float | None = None,
        *,
        tenant: str = "",
        weight: float = 1.0,
    ) -> torch.Tensor:
        """Encode ``tiles`` (N, S, S, 3) uint8. ``deadline`` is a ``time.monotonic()`` instant;
        ``tenant`` and ``weight`` come from the verified request context."""
        if self._closed:
            raise Unavailable("the vision encoder is shutting down")
        n = int(tiles.shape[0]) if tiles.dim() == 4 else 0
        if n < 1:
            raise InvalidArgument(f"tiles must be (N, S, S, 3) with N >= 1, got {tuple(tiles.shape)}")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("deadline passed before encoding started")
        if self._queued_tiles + n > self.config.max_queued_tiles:
            raise ResourceExhausted(
                f"vision encoder queue is full ({self._queued_tiles} tiles waiting)",
                reason="encoder_queue_full",
                retry_after=1.0,
            )
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        req = _Request(
            next(self._seq),
            int(priority),
            tiles.contiguous(),
            loop.create_future(),
            now,
            deadline,
            tenant=tenant,
            weight=float(weight),
        )
        self._waiting.append(req)
        self._queued_tiles += n
        self._gauge()
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._drop(req)
            raise

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for req in list(self._waiting):
            self._fail(req, Unavailable("the vision encoder shut down"))
        self._executor.shutdown(wait=True)

    # -- worker -------------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="tile-batcher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            self._expire(time.monotonic())
            batch = _slices(self.policy.plan(self._waiting, self.config.max_batch_tiles, time.monotonic()))
            if not batch:
                continue
            await self._forward(loop, batch)

    async def _wait_for_company(self) -> None:
        """Give a partly filled forward ``max_wait_ms`` (from the oldest arrival) to fill up."""
        budget = self.config.max_batch_tiles
        oldest = min(r.enqueued_at for r in self._waiting)
        until = oldest + self.config.max_wait_ms / 1000.0
        while self._waiting and self._queued_tiles < budget:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)
            except TimeoutError:
                return

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Slice]) -> None:
        now = time.monotonic()
        requests = []
        for s in batch:
            s.request.scheduled = s.stop
            if not s.request.started:
                s.request.started = True
                if self._metrics is not None:
                    waited = now - s.request.enqueued_at
                    self._metrics.queue_seconds.labels(self._label).observe(waited)
                    tenant = self._tenant_label(s.request.tenant)
                    self._metrics.tenant_queue_seconds.labels(self._label, tenant).observe(waited)
            if not requests or requests[-1] is not s.request:
                requests.append(s.request)
        tiles = torch.cat([s.request.tiles[s.start : s.stop] for s in batch])  # (sum, S, S, 3)
        n = int(tiles.shape[0])
        self._queued_tiles -= n
        self._gauge()
        t0 = time.monotonic()
        try:
            out = await loop.run_in_executor(self._executor, self.encode_fn, tiles)  # (sum, T, D)
        except Exception as exc:  # the forward failed: every request in it fails, the batcher goes on
            log.exception("vision forward of %d tiles failed", n)
            for req in requests:
                self._fail(req, exc)
            return
        self.forwards += 1
        self.tiles_encoded += n
        self.recent_batches.append((n, len(requests)))
        if self._metrics is not None:
            self._metrics.forward_seconds.labels(self._label).observe(time.monotonic() - t0)
            self._metrics.batch_tiles.labels(self._label).observe(n)
            self._metrics.batch_requests.labels(self._label).observe(len(requests))
            self._metrics.tiles_encoded.labels(self._label).inc(n)
            for sl in batch:
                tenant = self._tenant_label(sl.request.tenant)
                self._metrics.tenant_tiles.labels(self._label, tenant).inc(sl.stop - sl.start)
        offset = 0
        for s in batch:
            size = s.stop - s.start
            s.request.parts.append(out[offset : offset + size])
            offset += size
        for req in requests:
            if req.scheduled == req.total and req in self._waiting:
                self._waiting.remove(req)
                if not req.future.done():
                    parts = req.parts
                    req.future.set_result(parts[0] if len(parts) == 1 else torch.cat(parts))

    # -- bookkeeping --------------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for req in list(self._waiting):
            if req.future.done():
                self._drop(req)
            elif req.deadline is not None and req.deadline <= now:
                self._fail(req, DeadlineExceeded("deadline passed while waiting for the vision encoder"))

    def _fail(self, req: _Request, exc: BaseException) -> None:
        self._drop(req)
        if not req.future.done():
            req.future.set_exception(exc)

    def _drop(self, req: _Request) -> None:
        if req in self._waiting:
            self._waiting.remove(req)
            self._queued_tiles -= req.remaining
            req.scheduled = req.total
            self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queued_tiles.labels(self._label).set(self._queued_tiles)
