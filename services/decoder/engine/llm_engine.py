"""The synchronous engine: requests in, one step at a time, events out.

``step()`` reads at a glance: schedule -> execute -> update. Around it sit request admission
(prompt building, validation against the context and the cache) and output processing (incremental
detokenisation, stop strings, logprobs, usage). ``DecoderCore`` (``async_engine``) drives this from a
background thread; tests and benchmarks may drive it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.checkpoint import Checkpoint
from services.common.errors import InvalidArgument
from services.decoder.config import DecoderConfig
from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.detokenizer import IncrementalDetokenizer
from services.decoder.engine.model_runner import ModelRunner, plan_model
from services.decoder.engine.request import Request, RequestStatus
from services.decoder.engine.sampler import SamplerOutput
from services.decoder.engine.scheduler import RequestUpdate, ScheduledChunk, Scheduler, SchedulerLimits
from services.decoder.models.layers import TPContext
from services.decoder.prompting import load_prompt_builder
from services.decoder.types import GenerateInput, GenerationEvent, TokenLogprob, Usage


class LocalExecutor:
    """A single rank in this process."""

    def __init__(self, config: DecoderConfig):
        self.runner = ModelRunner(config, TPContext())

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_cache(num_blocks)

    def step(self, chunks: list[ScheduledChunk]) -> SamplerOutput | None:
        logits = self.runner.execute(self.runner.prepare(chunks))
        return None if logits is None else self.runner.sample(logits, chunks)

    def release(self, request_id: str) -> None:
        self.runner.sampler.release(request_id)

    def shutdown(self) -> None:
        pass


@dataclass
class _RequestState:
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, config: DecoderConfig, clock: Callable[[], float] = time.monotonic):
        checkpoint = Checkpoint.open(config.model)
        # What the model runner will build is checked first (no weight read), then the tokenizer: the
        # order in which ``services.decoder.support`` checks a checkpoint before start-up.
        self.max_model_len = plan_model(config, checkpoint.text_config).max_model_len
        # Decided once, here: every rank's runner gets the same, explicit context length.
        config = config.model_copy(
            update={"scheduler": config.scheduler.model_copy(update={"max_model_len": self.max_model_len})}
        )
        self.config = config
        self.clock = clock
        self.prompt_builder = load_prompt_builder(checkpoint)
        self.tokenizer = self.prompt_builder.tokenizer
        self.vocab_size = int(checkpoint.text_config["vocab_size"])
        self.eos_token_ids = self._eos_ids(checkpoint)
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
            num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        limits = SchedulerLimits(
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.scheduler.enable_chunked_prefill,
        )
        self.scheduler = Scheduler(limits, self.block_manager, clock=clock)
        self.states: dict[str, _RequestState] = {}

    def _eos_ids(self, checkpoint: Checkpoint) -> frozenset[int]:
        ids = set()
        gen = checkpoint.read_json("generation_config.json") or {}
        for source in (
            gen.get("eos_token_id"),
            checkpoint.text_config.get("eos_token_id"),
            self.tokenizer.eos_token_id,
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(t) for t in source)
        return frozenset(ids)

    # -- admission ---------------------------------------------------------------------------------
    def count_tokens(self, messages, image_tiles: list[int]) -> tuple[int, int]:
        return self.prompt_builder.count_tokens(messages, image_tiles)

    def make_request(self, inp: GenerateInput) -> Request:
        """Build and validate a request (tokenization included); raises ``InvalidArgument``."""
        if not inp.request_id:
            raise InvalidArgument("request_id must be set")
        if len(inp.images) > self.config.scheduler.max_images_per_request:
            raise InvalidArgument(
                f"{len(inp.images)} images exceed the limit of {self.config.scheduler.max_images_per_request}"
            )
        hidden = self.executor.runner.spec.hidden_size
        tiles_per_row = self.prompt_builder.tokens_per_tile
        for k, img in enumerate(inp.images):
            shape = tuple(getattr(img.embeddings, "shape", ()))
            if (
                not isinstance(img.tiles, int)
                or img.tiles < 1
                or shape != (img.tiles * tiles_per_row, hidden)
            ):
                raise InvalidArgument(
                    f"images[{k}]: embeddings of shape {shape} do not match {img.tiles} tiles "
                    f"x {tiles_per_row} rows x hidden size {hidden}"
                )
        params = inp.sampling.validate(self.vocab_size)
        prompt = self.prompt_builder.build(
            inp.messages, [i.tiles for i in inp.images], [i.content_hash for i in inp.images]
        )
        n = len(prompt.token_ids)
        if n >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {n} tokens ({prompt.num_image_tokens} of them image tokens); the context "
                f"holds {self.max_model_len} including at least one generated token",
                reason="context_length_exceeded",
            )
        room = self.max_model_len - n
        max_tokens = room if inp.max_tokens is None else inp.max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {inp.max_tokens!r}")
        if max_tokens > room:
            raise InvalidArgument(
                f"max_tokens={max_tokens} plus the {n}-token prompt exceed the context of {self.max_model_len}",
                reason="context_length_exceeded",
            )
        deadline = inp.deadline
        if deadline is not None and inp.deadline_is_epoch:
            deadline = self.clock() + (deadline - time.time())
        return Request(
            inp.request_id,
            prompt.token_ids,
            params,
            max_tokens,
            eos_token_ids=self.eos_token_ids,
            images=prompt.images,
            mm_embeddings=[i.embeddings for i in inp.images],
            cache_namespace=inp.cache_namespace,
            priority=inp.priority,
            arrival_time=self.clock(),
            deadline=deadline,
        )

    def add_request(self, req: Request) -> None:
        if req.request_id in self.states:
            raise InvalidArgument(f"request id {req.request_id!r} is already in use")
        try:
            self.scheduler.add_request(req)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        params = req.sampling_params
        self.states[req.request_id] = _RequestState(
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop)
        )

    def abort(
        self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> GenerationEvent | None:
        """End a request now; its blocks are free on return. Returns its final event (None if unknown)."""
        req = self.scheduler.finish_request(request_id, status)
        if req is None:
            return None
        return self._final_event(req, "", [], None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[GenerationEvent]:
        scheduled = self.scheduler.schedule()
        events = [self._final_event(req, "", [], None) for req in scheduled.finished]
        if scheduled.is_empty:
            return events
        out = self.executor.step(scheduled.chunks)
        sampled = out.token_ids if out is not None else []
        updates = self.scheduler.update_from_output(scheduled, sampled)
        logprobs = iter(out.logprobs if out is not None else [])
        by_id = {}
        for chunk in scheduled.chunks:
            if chunk.sample:
                by_id[chunk.request.request_id] = next(logprobs)
        for update in updates:
            events.append(self._process(update, by_id.get(update.request.request_id)))
        return events

    def _process(self, update: RequestUpdate, logprob: TokenLogprob | None) -> GenerationEvent:
        req = update.request
        state = self.states[req.request_id]
        token = update.new_token_ids[-1]
        ended_by_token = update.finished and req.status == RequestStatus.FINISHED_STOPPED
        text = "" if ended_by_token else state.detokenizer.add(update.new_token_ids)
        lps = [logprob] if logprob is not None else None
        if state.detokenizer.stopped and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            return self._final_event(req, text, [token], lps)
        event = GenerationEvent(req.request_id, text, [token], lps)
        if req.num_output_tokens == 1:
            event.prompt_tokens, event.image_tokens = req.num_prompt_tokens, req.num_image_tokens
        return event

    def _final_event(self, req: Request, text: str, token_ids: list[int], lps) -> GenerationEvent:
        state = self.states.pop(req.request_id, None)
        if state is not None:
            text += state.detokenizer.finish()
        self.executor.release(req.request_id)
        usage = Usage(
            prompt_tokens=req.num_prompt_tokens,
            image_tokens=req.num_image_tokens,
            completion_tokens=req.num_output_tokens,
            cached_prompt_tokens=max(req.num_cached_tokens, 0),
        )
        return GenerationEvent(
            req.request_id, text, token_ids, lps, finish_reason=req.status.finish_reason, usage=usage
        )

    def fail_all(self, message: str) -> list[GenerationEvent]:
        """End every request with ``error`` (the step raised); the engine stays usable."""
        events = []
        for request_id in list(self.scheduler.requests):
            event = self.abort(request_id, RequestStatus.FINISHED_ERROR)
            if event is not None:
                event.error = message
                events.append(event)
        return events

    def shutdown(self) -> None:
        self.executor.shutdown()
