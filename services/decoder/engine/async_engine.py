"""``DecoderCore``: the asyncio face of the engine.

The engine loop runs in one background thread (schedule -> execute -> update), so model steps never
block the event loop. Requests reach it through a thread-safe inbox. Each step's outputs (token ids)
go to a second thread, the ``OutputWorker`` (``output_processor``), which detokenises them, applies
stop strings and hands the events to each request's ``asyncio.Queue`` through
``loop.call_soon_threadsafe``, while the engine thread runs the next step. A request the worker ends
(a stop string) is ended by the engine at the top of its next step (``stop`` in the inbox; the
worker's module docstring says what that costs). Cancellation (``abort`` or closing the async
iterator) is handled at the top of the next step too: the request's blocks are freed before that step
is scheduled, and its stream ends with a ``cancelled`` event. Events of a request keep their order:
one thread makes them, from outputs the engine thread hands over in order.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.common.errors import InvalidArgument, Unavailable
from services.decoder.config import DecoderConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.output_processor import NewRequest, OutputProcessor, OutputWorker
from services.decoder.engine.request import Request
from services.decoder.types import GenerateInput, GenerationEvent


class DecoderCore:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        self.engine = LLMEngine(config, clock=clock)
        self.config = config
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.outputs = OutputWorker(
            OutputProcessor(self.engine.tokenizer),
            deliver=lambda event: self._deliver(event, event.request_id),
            stop=lambda request_id: self._post("stop", request_id),
        )
        self._thread = threading.Thread(target=self._loop, name="decoder-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> DecoderCore:
        return cls(DecoderConfig(model=str(path), **overrides))

    # -- public API --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def count_tokens(self, messages: list[dict[str, Any]], image_tiles: list[int]) -> tuple[int, int]:
        """(total prompt tokens, image tokens) the request would use; raises ``InvalidArgument``."""
        return self.engine.count_tokens(messages, image_tiles)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerationEvent]:
        """Stream the events of one request; the last one carries ``finish_reason`` and ``usage``."""
        if self._stopping:
            raise Unavailable("the decoder is shutting down")
        req = self.engine.make_request(inp)  # validation errors surface here, before anything runs
        if req.grammar is not None:
            await req.grammar.ready()  # compiled on the engine's grammar pool; a refusal surfaces here
            if self._stopping:
                raise Unavailable("the decoder is shutting down")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        with self._lock:
            if req.request_id in self._streams:
                raise InvalidArgument(f"request id {req.request_id!r} is already in use")
            self._streams[req.request_id] = (loop, events)
        self._post("add", req)
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finished
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a ``cancelled`` event (if still open)."""
        self._post("abort", request_id)

    def stats(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {
            "running": s.num_running(),
            "waiting": s.num_waiting(),
            "kv_usage": self.engine.block_manager.usage,
            "preemptions": s.num_preemptions,
        }

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.outputs.close()
        self.engine.shutdown()

    # -- the engine thread -------------------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _deliver(self, event: GenerationEvent | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
            if target is not None and (isinstance(event, BaseException) or event.finished):
                self._streams.pop(request_id, None)
        if target is not None:
            loop, q = target
            if not loop.is_closed():
                loop.call_soon_threadsafe(q.put_nowait, event)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                req: Request = payload
                try:
                    self.engine.admit(req)
                except Exception as exc:  # noqa: BLE001 - handed to the caller's stream
                    self._deliver(exc, req.request_id)
                else:
                    self.outputs.add_request(NewRequest.of(req))
            elif kind == "abort":
                out = self.engine.abort_output(payload)
                if out is not None:
                    self.outputs.put([out])
            elif kind == "stop":
                self.engine.stop_request(payload)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step_outputs()
            except Exception as exc:  # noqa: BLE001 - the step failed: end its requests, keep serving
                outputs = self.engine.fail_all_outputs(f"{type(exc).__name__}: {exc}")
            self.outputs.put(outputs)
        for request_id in list(self.engine.scheduler.requests):
            out = self.engine.abort_output(request_id)
            if out is not None:
                self.outputs.put([out])
