"""``DecoderCore``: the asyncio face of the engine.

The engine's loop (``engine_loop``: schedule -> execute -> update) runs where
``DecoderConfig.engine_process`` says: in a process of its own (``core_process``, the default and
what the Serve deployment runs), so model steps never share the GIL with gRPC, asyncio and
detokenisation; or on a background thread of this process (``engine_process: false``, for tests and
benchmarks that look inside the engine). Either way the caller's side is the same: requests are
built and validated here (``make_request``: prompt building, tokenization), handed to the loop as
commands, and each turn's report comes back in order — the requests admitted, those refused (the
error is raised in the caller's stream), the outputs (token ids). A second thread, the
``OutputWorker`` (``output_processor``), detokenises the outputs, applies stop strings and hands the
events to each request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``, while the engine
runs the next step. A request the worker ends (a stop string) is ended by the engine at the top of
its next turn (``StopRequest``; the worker's module docstring says what that costs). Cancellation
(``abort`` or closing the async iterator) is handled at the top of the next turn too: the request's
blocks are freed before that step is scheduled, and its stream ends with a ``cancelled`` event.
Events of a request keep their order: one thread makes them, from reports that arrive in order.

An engine process that dies ends every open stream with ``Unavailable``, refuses new requests with
it, and ``check_health`` raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.common.errors import InvalidArgument, Unavailable
from services.decoder.config import DecoderConfig
from services.decoder.engine.engine_loop import (
    AbortRequest,
    AddRequest,
    Command,
    EngineReport,
    EngineStats,
    EngineThread,
    StopRequest,
)
from services.decoder.engine.intake import RequestIntake
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.output_processor import OutputProcessor, OutputWorker
from services.decoder.types import GenerateInput, GenerationEvent


class DecoderCore:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._failure: str | None = None  # why the engine process is gone, once it is
        self._stats = EngineStats()
        if config.engine_process:
            if clock is not time.monotonic:
                raise ValueError(
                    "a clock of its own needs engine_process=False (the engine process's is monotonic)"
                )
            self.engine: LLMEngine | None = None  # in the engine process
            self.intake = RequestIntake(config)
        else:
            self.engine = LLMEngine(config, clock=clock)
            self.intake = self.engine.intake
        self.outputs = OutputWorker(
            OutputProcessor(self.intake.tokenizer),
            deliver=lambda event: self._deliver(event, event.request_id),
            stop=lambda request_id: self._post(StopRequest(request_id)),
        )
        try:
            self._backend = self._start_backend()
        except BaseException:
            self.outputs.close()
            raise

    def _start_backend(self):
        if self.engine is not None:
            return EngineThread(self.engine, self._on_report)
        from services.decoder.engine.core_process import EngineProcess

        return EngineProcess(self.config, self._on_report, self._on_exit)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> DecoderCore:
        return cls(DecoderConfig(model=str(path), **overrides))

    # -- public API --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.intake.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.intake.max_model_len

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id (None when the engine runs on a thread of this process)."""
        return self._backend.pid

    def count_tokens(self, messages: list[dict[str, Any]], image_tiles: list[int]) -> tuple[int, int]:
        """(total prompt tokens, image tokens) the request would use; raises ``InvalidArgument``."""
        return self.intake.count_tokens(messages, image_tiles)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerationEvent]:
        """Stream the events of one request; the last one carries ``finish_reason`` and ``usage``."""
        if self._stopping:
            raise Unavailable("the decoder is shutting down")
        self.check_health()
        req = self.intake.make_request(inp)  # validation errors surface here, before anything runs
        if req.grammar is not None:
            await req.grammar.ready()  # compiled on the intake's grammar pool; a refusal surfaces here
            if self._stopping:
                raise Unavailable("the decoder is shutting down")
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        with self._lock:
            if self._failure is not None:
                raise Unavailable(self._failure)
            if req.request_id in self._streams:
                raise InvalidArgument(f"request id {req.request_id!r} is already in use")
            self._streams[req.request_id] = (asyncio.get_running_loop(), events)
        try:
            self._backend.post(AddRequest(req))
        except BaseException:
            with self._lock:
                self._streams.pop(req.request_id, None)
            raise
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
        self._post(AbortRequest(request_id))

    def stats(self) -> dict[str, float]:
        """The engine's load as of its last turn: running, waiting, kv_usage, preemptions."""
        return self._stats.as_dict()

    def check_health(self) -> None:
        """Raise ``Unavailable`` when the engine (its process or thread) is gone."""
        if self._failure is not None:
            raise Unavailable(self._failure)
        self._backend.check_health()

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._backend.close()
        self.outputs.close()
        if self.engine is None:  # an engine on a thread closes its own intake
            self.intake.shutdown()

    # -- what the engine reports -------------------------------------------------------------------
    def _post(self, command: Command) -> None:
        """Abort and stop: nothing to do once the engine is gone."""
        with contextlib.suppress(Unavailable):
            self._backend.post(command)

    def _on_report(self, report: EngineReport) -> None:
        """One turn of the engine, in order (on the engine thread, or the engine process's reader)."""
        for new in report.admitted:
            self.outputs.add_request(new)
        for refusal in report.refused:
            self._deliver(refusal.error, refusal.request_id)
        self.outputs.put(report.outputs)
        self._stats = report.stats

    def _on_exit(self, error: Unavailable) -> None:
        """The engine process died: every open stream ends with ``Unavailable``."""
        with self._lock:
            self._failure = str(error)
            streams, self._streams = self._streams, {}
        for loop, events in streams.values():
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, Unavailable(self._failure))

    def _deliver(self, event: GenerationEvent | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
            if target is not None and (isinstance(event, BaseException) or event.finished):
                self._streams.pop(request_id, None)
        if target is not None:
            loop, q = target
            if not loop.is_closed():
                loop.call_soon_threadsafe(q.put_nowait, event)
