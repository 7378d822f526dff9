"""The engine in a process of its own (``DecoderConfig.engine_process``), as vLLM v1 runs its EngineCore.

The split: the engine process runs the scheduler and the model (``EngineLoop`` over an ``LLMEngine``;
its tensor-parallel ranks, if any, are its own children), so its steps never share a GIL with the
replica's gRPC, asyncio and output processing. The replica's process keeps request building
(``RequestIntake``), detokenisation and stop strings (``OutputWorker``) and the streams.

One duplex pipe joins them. Down it go ``engine_loop``'s commands (``AddRequest``, ``AbortRequest``,
``StopRequest``) and ``Shutdown``; up it come ``Ready`` (or ``StartupFailed``) once, then an
``EngineReport`` per turn that did something. Image embeddings cross once, through shared memory:
``torch.multiprocessing``'s pickling moves a tensor's storage into shared memory and the engine
process maps the same pages, so the bytes are copied once (into shared memory), not pickled, piped
and unpickled (``benchmarks/engine_process_bench.py`` measures both).

Lifecycle:

- start-up: the process is spawned (never forked: CUDA and threads) by a thread of the parent that
  lives as long as the process, and the parent waits for ``Ready``; an error of the engine's
  construction (a KV cache too small: ``FailedPrecondition``) comes back as ``StartupFailed`` and is
  raised in the parent with its type and message.
- a dead engine process (killed, crashed): the parent's reader sees the pipe's end of file at once;
  every open stream ends with ``Unavailable`` and ``check_health`` raises, so Serve replaces the
  replica.
- ``close()`` sends ``Shutdown`` (open requests end ``cancelled``), the engine shuts its ranks down
  and exits, the parent joins it, and kills it if it has not exited within the timeout.
- a parent that dies without ``close()`` (SIGKILL) takes the engine process with it: the
  parent-death signal (``services.common.lifeline``), and the pipe's end of file otherwise. The
  engine process ignores SIGINT and SIGTERM (a terminal's Ctrl-C, a process group's SIGTERM): it
  lives and ends with its parent, which may be draining its streams.
- the process is not a daemon: a daemonic process cannot start tensor-parallel ranks. The parent
  closes it at interpreter exit (``atexit``), before ``multiprocessing`` would wait for it.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp  # registers the reductions that share tensors' memory

from services.common.errors import Unavailable
from services.common.lifeline import exit_with_parent
from services.decoder.config import DecoderConfig
from services.decoder.engine.engine_loop import Command, EngineLoop, EngineReport, Refusal
from services.decoder.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """The engine is built (weights loaded, KV cache allocated) and serving."""


@dataclass(frozen=True)
class StartupFailed:
    error: BaseException


@dataclass(frozen=True)
class Shutdown:
    """End the loop (open requests end ``cancelled``), shut the engine down, exit."""


def portable(exc: BaseException) -> BaseException:
    """``exc`` when it survives pickling with its type and message, else a ``RuntimeError`` naming both."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - whatever pickling raises, the fallback below carries the message
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the engine process -------------------------------------------------------------------------------
def engine_main(config_json: str, conn, parent_pid: int, torch_threads: int) -> None:
    """Entry point of the engine process: build the engine, report ``Ready``, run the loop."""
    exit_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)  # a Python handler, so the ranks it spawns get the default back
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s decoder-engine %(message)s")
    torch.set_num_threads(torch_threads)
    try:
        engine = LLMEngine(DecoderConfig.model_validate_json(config_json))
    except BaseException as exc:
        log.exception("the decoder's engine could not start")
        conn.send(StartupFailed(portable(exc)))
        conn.close()
        return
    loop = EngineLoop(engine, report=lambda report: _send(conn, loop, report))
    try:
        conn.send(Ready())
        threading.Thread(target=_receive, args=(conn, loop), name="decoder-engine-inbox", daemon=True).start()
        loop.run()
    finally:
        engine.shutdown()
        conn.close()


def _ignore(signum, frame) -> None:
    return None


def _receive(conn, loop: EngineLoop) -> None:
    """The engine process's inbox: commands from the pipe to the loop. The parent gone ends the loop,
    and so does a command that cannot be read (whose request would otherwise wait forever): the
    parent then ends every open stream, and Serve replaces the replica."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            log.warning("the decoder's engine lost its parent: exiting")
            break
        try:
            command = ForkingPickler.loads(data)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("the decoder's engine could not read a command: exiting")
            break
        if isinstance(command, Shutdown):
            break
        loop.post(command)
    loop.close()


def _send(conn, loop: EngineLoop, report: EngineReport) -> None:
    if report.refused:
        report = replace(report, refused=[Refusal(r.request_id, portable(r.error)) for r in report.refused])
    try:
        conn.send(report)
    except OSError:  # the parent is gone: nobody to report to
        loop.close()


# -- the parent's side --------------------------------------------------------------------------------
class EngineProcess:
    """The parent's handle on the engine process: ``post`` commands, ``report`` gets each report (on
    the reader thread, in order), ``on_exit`` gets an ``Unavailable`` if the process ends unasked."""

    def __init__(
        self,
        config: DecoderConfig,
        report: Callable[[EngineReport], None],
        on_exit: Callable[[Unavailable], None],
    ):
        self._report, self._on_exit = report, on_exit
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=engine_main,
            args=(config.model_dump_json(), child_conn, os.getpid(), torch.get_num_threads()),
            name="decoder-engine",
            daemon=False,
        )
        self._send_lock = threading.Lock()
        self._closing = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._reader = threading.Thread(
            target=self._run, args=(child_conn,), name="decoder-engine-reader", daemon=True
        )
        self._reader.start()
        self._started.wait()
        if self._start_error is not None:
            self._reader.join()
            self._conn.close()
            raise self._start_error
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def post(self, command: Command) -> None:
        """Send a command; ``Unavailable`` once the process is gone or closing."""
        with self._send_lock:
            if self._closing or self._conn.closed:
                raise Unavailable("the decoder's engine process is shutting down")
            try:
                self._conn.send(command)
            except (OSError, ValueError) as exc:
                raise Unavailable(f"the decoder's engine process is gone: {exc}") from exc

    def check_health(self) -> None:
        if not self._closing and not self._reader.is_alive():
            raise Unavailable(f"the decoder's engine process has exited (code {self.process.exitcode})")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the process (its ranks with it) and join it; kill it past ``timeout``."""
        with self._send_lock:
            if self._closing:
                return
            self._closing = True
            try:
                self._conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        atexit.unregister(self.close)
        self._reader.join(timeout)
        if self._reader.is_alive():
            log.warning("the decoder's engine process did not exit in %.0f s: killing it", timeout)
            self.process.kill()
            self._reader.join(10)
        self._conn.close()

    # -- the reader thread: starts the process, outlives it ------------------------------------------
    def _run(self, child_conn) -> None:
        try:
            self.process.start()
        except BaseException as exc:  # noqa: BLE001 - raised by the constructor
            self._start_error = exc
            self._started.set()
            return
        child_conn.close()  # the child's end lives in the child only: its exit is our end of file
        if self._await_ready():
            self._read()
        self.process.join()
        self._started.set()  # a start that failed: the constructor raises once the process is gone

    def _await_ready(self) -> bool:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = None
        if isinstance(message, Ready):
            self._started.set()
            return True
        if isinstance(message, StartupFailed):
            self._start_error = message.error
        else:
            self.process.join(10)
            self._start_error = Unavailable(
                f"the decoder's engine process exited while starting (code {self.process.exitcode})"
            )
        return False

    def _read(self) -> None:
        while True:
            try:
                report = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - unreadable: the engine's state is unknown, end it
                log.exception("a report of the decoder's engine could not be read")
                self.process.kill()
                break
            try:
                self._report(report)
            except Exception:  # noqa: BLE001 - a delivery failed: keep reading for the others
                log.exception("handling the decoder engine's report failed")
        if not self._closing:
            self.process.join(10)
            log.error("the decoder's engine process exited unasked (code %s)", self.process.exitcode)
            self._on_exit(Unavailable(f"the decoder's engine process exited (code {self.process.exitcode})"))
