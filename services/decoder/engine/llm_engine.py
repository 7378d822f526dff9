"""The synchronous engine: requests in, one step at a time, events out.

``step_outputs()`` reads at a glance: schedule -> execute -> update; it returns what the step did to
each request as token ids (``EngineOutput``), no text. Around it sit request admission (prompt
building, validation against the context and the cache) and output processing
(``output_processor``: incremental detokenisation, stop strings, usage), which ``step()`` runs in the
step for callers that drive the engine directly (tests, benchmarks). ``DecoderCore``
(``async_engine``) drives the engine from a background thread and processes the outputs on another,
while the next step runs (``admit``, ``step_outputs``, ``abort_output``, ``stop_request``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from services.common.errors import InvalidArgument
from services.decoder.config import DecoderConfig
from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.intake import RequestIntake
from services.decoder.engine.model_runner import Launched, ModelRunner
from services.decoder.engine.output_processor import EngineOutput, NewRequest, OutputProcessor
from services.decoder.engine.request import Request, RequestStatus
from services.decoder.engine.sampler import SamplerOutput, SampleRow
from services.decoder.engine.scheduler import ScheduledChunk, Scheduler, SchedulerLimits, SchedulerOutput
from services.decoder.models.layers import TPContext
from services.decoder.types import GenerateInput, GenerationEvent


class LocalExecutor:
    """A single rank in this process. Host work (inputs, attention metadata, what sampling reads of
    each request) runs on the caller's thread at ``launch``; the forward and the draw run on one device
    worker thread, in launch order, so the caller schedules the next step meanwhile (torch releases
    the GIL in its kernels; on a GPU the kernels run asynchronously as well)."""

    def __init__(self, config: DecoderConfig):
        self.runner = ModelRunner(config, TPContext())
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="decoder-device")
        self._rows: dict[str, int] = {}  # request id -> row of the last launched step's sampled ids

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_cache(num_blocks)

    def launch(self, chunks: list[ScheduledChunk]) -> Launched:
        step = self.runner.prepare(chunks, self._rows)
        meta = self.runner.metadata(step)
        rows = [SampleRow.of(ch.request) for ch in chunks if ch.sample]
        self._rows = {row.request_id: i for i, row in enumerate(rows)}
        return Launched(self._worker.submit(self.runner.run, step, meta, rows))

    def step(self, chunks: list[ScheduledChunk]) -> SamplerOutput | None:
        return self.launch(chunks).result()

    def release(self, request_id: str) -> None:
        self._worker.submit(self.runner.sampler.release, request_id)  # after the steps launched before

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)


class LLMEngine:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        # Admission (prompt building, validation, grammars) reads no weight: the intake, first, in the
        # order in which ``services.decoder.support`` checks a checkpoint before start-up.
        self.intake = RequestIntake(config, clock=clock)
        self.max_model_len = self.intake.max_model_len
        config = self.intake.config  # every rank's runner gets the same, explicit context length
        self.config = config
        self.clock = clock
        self.prompt_builder = self.intake.prompt_builder
        self.tokenizer = self.intake.tokenizer
        self.vocab_size = self.intake.vocab_size
        self.eos_token_ids = self.intake.eos_token_ids
        self.grammars = self.intake.grammars
        if config.parallel.tensor_parallel_size > 1:
            from services.decoder.engine.tp_worker import TPDriver

            self.executor = TPDriver(config)
        else:
            self.executor = LocalExecutor(config)
        try:
            num_blocks = self.executor.runner.determine_num_blocks()
            self.executor.init_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(
            num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            fair_share=config.scheduler.fair_share,
        )
        limits = SchedulerLimits(
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.scheduler.enable_chunked_prefill,
            fair_share=config.scheduler.fair_share,
            max_wait_s=config.scheduler.max_wait_s,
        )
        self.scheduler = Scheduler(limits, self.block_manager, clock=clock)
        overlap = config.scheduler.overlap
        overlap = config.device == "cuda" if overlap == "auto" else overlap
        self.overlap = overlap and config.parallel.tensor_parallel_size == 1
        self._pending: tuple[SchedulerOutput, Launched] | None = None  # the step launched, not resolved
        self.processor = OutputProcessor(self.tokenizer)  # used by ``step``; DecoderCore has its own

    # -- admission ---------------------------------------------------------------------------------
    def count_tokens(self, messages, image_tiles: list[int]) -> tuple[int, int]:
        return self.intake.count_tokens(messages, image_tiles)

    def make_request(self, inp: GenerateInput) -> Request:
        """Build and validate a request (tokenization included); raises ``InvalidArgument``."""
        return self.intake.make_request(inp)

    def add_request(self, req: Request) -> None:
        """Admit ``req``; its outputs are processed by ``step`` (``DecoderCore`` calls ``admit``)."""
        self.admit(req)
        self.processor.add_request(NewRequest.of(req))

    def admit(self, req: Request) -> None:
        """Hand ``req`` to the scheduler; raises ``InvalidArgument`` (a request id in use, a request
        the cache cannot hold)."""
        if req.request_id in self.scheduler.requests:
            raise InvalidArgument(f"request id {req.request_id!r} is already in use")
        if req.grammar is not None:
            req.grammar.wait()  # at once where the caller awaited ``Grammar.ready`` (``DecoderCore``)
        try:
            self.scheduler.add_request(req)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc

    def abort(
        self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> GenerationEvent | None:
        """End a request now; its blocks are free on return. Returns its final event (None if unknown)."""
        out = self.abort_output(request_id, status)
        events = self._process([out]) if out is not None else []
        return events[0] if events else None

    def abort_output(
        self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> EngineOutput | None:
        """``abort`` without output processing: the request's last output (None if unknown)."""
        req = self.scheduler.finish_request(request_id, status)
        return None if req is None else self._last_output(req, [], None)

    def stop_request(self, request_id: str) -> None:
        """End a request whose stream output processing has ended (a stop string): no output."""
        if self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED) is not None:
            self.executor.release(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._pending is not None

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[GenerationEvent]:
        """One step and its output processing; a request that meets a stop string ends here."""
        return self._process(self.step_outputs())

    def step_outputs(self) -> list[EngineOutput]:
        """Schedule and launch a step, then resolve the one before it (overlap) or this one (in series).

        Under overlap a request's outputs come one call after its step was launched; a step runs in
        series when a request in the batch needs its tokens on the host to sample (penalties, a grammar).
        """
        try:
            outputs = [] if self.overlap and not self._needs_sync() else self._resolve()
            scheduled = self.scheduler.schedule()
            outputs += [self._last_output(req, [], None) for req in scheduled.finished]
            launched = None
            if not scheduled.is_empty:
                launched = (scheduled, self.executor.launch(scheduled.chunks))
                self.scheduler.advance(scheduled)
            outputs += self._resolve()
            self._pending = launched
            if not self.overlap:
                outputs += self._resolve()
            return outputs
        except BaseException:
            self._pending = None
            raise

    def _needs_sync(self) -> bool:
        return any(r.sampling_params.needs_penalties or r.needs_sync for r in self.scheduler.running)

    def _resolve(self) -> list[EngineOutput]:
        """Wait for the launched step's tokens and hand them to the scheduler."""
        if self._pending is None:
            return []
        scheduled, launched = self._pending
        self._pending = None
        out = launched.result()
        updates = self.scheduler.resolve(scheduled, out.token_ids if out is not None else [])
        logprobs = iter(out.logprobs if out is not None else [])
        by_id = {chunk.request.request_id: next(logprobs) for chunk in scheduled.chunks if chunk.sample}
        outputs = []
        for update in updates:
            req, lp = update.request, by_id.get(update.request.request_id)
            lps = [lp] if lp is not None else None
            if update.finished:
                outputs.append(self._last_output(req, update.new_token_ids, lps))
            else:
                outputs.append(EngineOutput(req.request_id, update.new_token_ids, lps))
        return outputs

    def _last_output(self, req: Request, token_ids: list[int], lps) -> EngineOutput:
        self.executor.release(req.request_id)
        return EngineOutput(
            req.request_id,
            token_ids,
            lps,
            finish_reason=req.status.finish_reason,
            ended_by_token=bool(token_ids) and req.status == RequestStatus.FINISHED_STOPPED,
            cached_prompt_tokens=max(req.num_cached_tokens, 0),
        )

    def _process(self, outputs: list[EngineOutput]) -> list[GenerationEvent]:
        done = self.processor.process(outputs)
        for request_id in done.to_stop:
            self.stop_request(request_id)
        return done.events

    def fail_all(self, message: str) -> list[GenerationEvent]:
        """End every request with ``error`` (the step raised); the engine stays usable."""
        return self._process(self.fail_all_outputs(message))

    def fail_all_outputs(self, message: str) -> list[EngineOutput]:
        """``fail_all`` without output processing."""
        outputs = []
        for request_id in list(self.scheduler.requests):
            out = self.abort_output(request_id, RequestStatus.FINISHED_ERROR)
            if out is not None:
                out.error = message
                outputs.append(out)
        return outputs

    def shutdown(self) -> None:
        self.intake.shutdown()
        self.executor.shutdown()
