"""The engine's loop: commands in, one step at a time, reports out.

``EngineLoop.run`` drives an ``LLMEngine`` wherever it runs — on a thread of ``DecoderCore``'s own
process (``EngineThread``) or as the main loop of the engine's process (``core_process``). Each turn
takes the commands posted since the last one (add a request, abort one, stop one that output
processing ended), runs one step while a request is unfinished (schedule -> execute -> update:
``LLMEngine.step_outputs``), and hands what happened to ``report`` as an ``EngineReport``: the
requests admitted (always before any output of theirs), those the engine refused with the error,
the outputs (token ids, no text) and the engine's load. A step that raises ends its requests with
``error`` and the loop goes on. ``close()`` ends the loop; requests still open end ``cancelled``.

These types are also what crosses the engine process's pipe: commands one way, reports the other.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from services.common.errors import Unavailable
from services.decoder.autoscaling import waiting_tokens
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.output_processor import EngineOutput, NewRequest
from services.decoder.engine.request import Request

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # an idle loop wakes at a command, or after this long


@dataclass(frozen=True)
class AddRequest:
    """Admit a request: the whole request, its image embeddings included, crosses once."""

    request: Request


@dataclass(frozen=True)
class AbortRequest:
    """End a request now (a cancelled stream); its last output says ``cancelled``."""

    request_id: str


@dataclass(frozen=True)
class StopRequest:
    """End a request whose stream output processing has ended (a stop string): no output."""

    request_id: str


Command = AddRequest | AbortRequest | StopRequest


@dataclass(frozen=True)
class EngineStats:
    """The engine's load, as ``DecoderCore.stats`` reports it."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    tenants: dict[str, dict[str, float]] = field(default_factory=dict)  # ``Scheduler.tenant_stats``
    waiting_tokens: int = 0  # prompt tokens still to compute over the waiting requests (autoscaling)

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineStats:
        s = engine.scheduler
        return cls(
            s.num_running(),
            s.num_waiting(),
            engine.block_manager.usage,
            s.num_preemptions,
            s.tenant_stats(),
            waiting_tokens(s.waiting),
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Refusal:
    """A request the engine did not admit, and why (an ``InvalidArgument`` for the caller's stream)."""

    request_id: str
    error: BaseException


@dataclass
class EngineReport:
    """What one turn did. Consumers take ``admitted`` first, then ``refused``, then ``outputs``."""

    admitted: list[NewRequest] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    outputs: list[EngineOutput] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)

    @property
    def empty(self) -> bool:
        return not (self.admitted or self.refused or self.outputs)


class EngineLoop:
    def __init__(self, engine: LLMEngine, report: Callable[[EngineReport], None]):
        self.engine = engine
        self._report = report
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._stats = EngineStats.of(engine)
        self._compiling: dict[str, Request] = {}  # added, their grammar still compiling

    def post(self, command: Command) -> None:
        """Thread-safe: the command is taken at the top of the next turn."""
        self._inbox.put(command)
        self._wake.set()

    def close(self) -> None:
        """End the loop after the current turn (thread-safe)."""
        self._closed = True
        self._wake.set()

    def run(self) -> None:
        while not self._closed:
            self._send(self._take_commands())
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=IDLE_WAIT_S)
                self._wake.clear()
                continue
            self._send(EngineReport(outputs=self._step()))
        self._send(self._cancel_all())

    def _take_commands(self) -> EngineReport:
        report = EngineReport()
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                self._admit_compiled(report)
                return report
            if isinstance(command, AddRequest):
                self._compile(command.request)
            elif isinstance(command, AbortRequest):
                if self._compiling.pop(command.request_id, None) is not None:
                    report.refused.append(Refusal(command.request_id, Unavailable("cancelled")))
                out = self.engine.abort_output(command.request_id)
                if out is not None:
                    report.outputs.append(out)
            else:
                self.engine.stop_request(command.request_id)

    def _compile(self, req: Request) -> None:
        """Hold ``req`` until its grammar is compiled, on the engine's grammar pool: a request that came
        from another process brings its response format, not its matcher."""
        fmt = req.sampling_params.response_format
        if fmt is not None and req.grammar is None:
            req.grammar = self.engine.grammars.grammar_for(fmt)
        if req.grammar is not None and not req.grammar.done():
            req.grammar.on_done(self._wake.set)
        self._compiling[req.request_id] = req

    def _admit_compiled(self, report: EngineReport) -> None:
        for request_id, req in list(self._compiling.items()):
            if req.grammar is not None and not req.grammar.done():
                continue
            del self._compiling[request_id]
            try:
                self.engine.admit(req)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's stream
                report.refused.append(Refusal(req.request_id, exc))
            else:
                report.admitted.append(NewRequest.of(req))

    def _step(self) -> list[EngineOutput]:
        try:
            return self.engine.step_outputs()
        except Exception as exc:  # noqa: BLE001 - the step failed: end its requests, keep serving
            log.exception("an engine step failed; its requests end with an error")
            return self.engine.fail_all_outputs(f"{type(exc).__name__}: {exc}")

    def _cancel_all(self) -> EngineReport:
        report = EngineReport()
        for request_id in list(self.engine.scheduler.requests):
            out = self.engine.abort_output(request_id)
            if out is not None:
                report.outputs.append(out)
        return report

    def _send(self, report: EngineReport) -> None:
        """Report a turn that did something, or changed the load (an idle turn reports nothing)."""
        report.stats = EngineStats.of(self.engine)
        if report.empty and report.stats == self._stats:
            return
        self._stats = report.stats
        self._report(report)


class EngineThread:
    """The loop on a thread of this process (``DecoderConfig.engine_process`` false)."""

    def __init__(self, engine: LLMEngine, report: Callable[[EngineReport], None]):
        self.engine = engine
        self.loop = EngineLoop(engine, report)
        self._closed = False
        self._thread = threading.Thread(target=self.loop.run, name="decoder-engine", daemon=True)
        self._thread.start()

    pid = None  # no process of its own

    def post(self, command: Command) -> None:
        self.loop.post(command)

    def check_health(self) -> None:
        if not self._closed and not self._thread.is_alive():
            raise Unavailable("the decoder's engine thread has ended")

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.close()
        self._thread.join(timeout)
        self.engine.shutdown()
