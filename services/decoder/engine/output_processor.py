"""Output processing: what a step did to each request (token ids, logprobs, an end) becomes the events
of the request's stream (text, stop strings, the prompt's size, usage).

The engine's step ends with ``EngineOutput``s: token ids and no text. ``OutputProcessor`` turns them
into ``GenerationEvent``s: incremental detokenisation (``detokenizer``), stop strings, the prompt's
size on the first event and the usage on the last. It holds one state per request, made from the
request's ``NewRequest`` (which reaches it before any output of the request) and dropped with the
request's last event.

Stop strings and the scheduler: a stop string is found in text, so here. The request's stream ends at
once: its last event has ``finish_reason`` stop, the text up to the stop string and the usage of the
tokens emitted so far, and the processor names the request in ``to_stop`` for the engine to end it
too (``LLMEngine.stop_request``: its blocks are freed, no event). Whatever the engine says of that
request afterwards (tokens of steps it ran before it heard, its own last output) is dropped: tokens
past the stop string are never emitted, never counted. A request on which detokenisation fails ends
the same way, with ``error``; the others go on.

Where it runs:

- in the engine's step (``LLMEngine.step``, for tests and benchmarks that drive the engine): a
  request that meets a stop string is ended before the next step, as it always was;
- on a thread of its own (``OutputWorker``, what ``DecoderCore`` serves with): the engine hands each
  step's outputs over (from its own process by default, or from its thread) and goes straight on to
  the next step, so the text of step N is made while step N+1 runs. A request whose stop string
  appears in step N's text is ended by the engine at the top of the next step it starts after
  hearing of it: it runs for one more step (two if step N+1 had already started when the text was
  ready), whose token is dropped, as vLLM v1 drops it. With the engine in its own process the
  worker's Python work (a few microseconds a token) never holds up a step; with the engine on a
  thread it takes the GIL like the engine thread's own: it runs beside the step while torch computes
  without the GIL, and otherwise takes turns with it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from services.decoder.engine.detokenizer import IncrementalDetokenizer
from services.decoder.engine.request import Request
from services.decoder.types import FinishReason, GenerationEvent, TokenLogprob, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewRequest:
    """What the processor needs of a request, before its first output."""

    request_id: str
    skip_special_tokens: bool
    stop: tuple[str, ...]
    prompt_tokens: int
    image_tokens: int

    @classmethod
    def of(cls, req: Request) -> NewRequest:
        params = req.sampling_params
        return cls(
            req.request_id,
            params.skip_special_tokens,
            tuple(params.stop),
            req.num_prompt_tokens,
            req.num_image_tokens,
        )


@dataclass
class EngineOutput:
    """What one step, or an end, did to one request: its new token ids, no text.

    ``ended_by_token``: the last token is an end-of-sequence or stop token id, which gets no text.
    ``cached_prompt_tokens``: the prompt's prefix-cache hits, for the usage.
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    ended_by_token: bool = False
    cached_prompt_tokens: int = 0
    error: str | None = None


@dataclass
class ProcessedOutputs:
    events: list[GenerationEvent] = field(default_factory=list)
    to_stop: list[str] = field(default_factory=list)  # ended here (a stop string): the engine ends them


@dataclass
class _RequestState:
    request: NewRequest
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0  # output tokens emitted so far


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def add_request(self, new: NewRequest) -> None:
        detokenizer = IncrementalDetokenizer(self.tokenizer, new.skip_special_tokens, list(new.stop))
        self.states[new.request_id] = _RequestState(new, detokenizer)

    def process(self, outputs: list[EngineOutput]) -> ProcessedOutputs:
        done = ProcessedOutputs()
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue  # ended here already: what the engine says of it afterwards is dropped
            try:
                event = self._event(state, out)
            except Exception as exc:  # noqa: BLE001 - this request ends with an error, the others go on
                log.exception("detokenising request %s failed", out.request_id)
                event = self._last_event(state, out, "", FinishReason.ERROR)
                event.error = f"detokenisation failed: {type(exc).__name__}: {exc}"
            if event.finished:
                del self.states[out.request_id]
                if out.finish_reason is None:
                    done.to_stop.append(out.request_id)
            done.events.append(event)
        return done

    def _event(self, state: _RequestState, out: EngineOutput) -> GenerationEvent:
        detokenizer = state.detokenizer
        text = "" if out.ended_by_token else detokenizer.add(out.token_ids)
        reason = out.finish_reason
        if reason is not None:
            text += detokenizer.finish()
        if detokenizer.stopped and reason in (None, FinishReason.LENGTH):
            reason = FinishReason.STOP
        if reason is not None:
            event = self._last_event(state, out, text, reason)
            event.error = out.error
            return event
        first = state.num_tokens == 0
        state.num_tokens += len(out.token_ids)
        event = GenerationEvent(out.request_id, text, out.token_ids, out.logprobs)
        if first:
            event.prompt_tokens = state.request.prompt_tokens
            event.image_tokens = state.request.image_tokens
        return event

    def _last_event(
        self, state: _RequestState, out: EngineOutput, text: str, reason: FinishReason
    ) -> GenerationEvent:
        state.num_tokens += len(out.token_ids)
        usage = Usage(
            prompt_tokens=state.request.prompt_tokens,
            image_tokens=state.request.image_tokens,
            completion_tokens=state.num_tokens,
            cached_prompt_tokens=out.cached_prompt_tokens,
        )
        return GenerationEvent(
            out.request_id, text, out.token_ids, out.logprobs, finish_reason=reason, usage=usage
        )


class OutputWorker:
    """An ``OutputProcessor`` on a thread of its own, fed in order by the engine thread.

    ``deliver(event)`` hands each event to its stream; ``stop(request_id)`` asks the engine to end a
    request the processor ended (it is called before that request's last event is delivered, so the
    engine hears of it before its client can reuse the request id).
    """

    def __init__(
        self,
        processor: OutputProcessor,
        deliver: Callable[[GenerationEvent], None],
        stop: Callable[[str], None],
        name: str = "decoder-output",
    ):
        self.processor = processor
        self._deliver, self._stop = deliver, stop
        self._queue: queue.SimpleQueue[NewRequest | list[EngineOutput] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add_request(self, new: NewRequest) -> None:
        self._queue.put(new)

    def put(self, outputs: list[EngineOutput]) -> None:
        if outputs:
            self._queue.put(outputs)

    def close(self, timeout: float = 30.0) -> None:
        """Process what was put so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, NewRequest):
                self.processor.add_request(item)
                continue
            try:
                done = self.processor.process(item)
                for request_id in done.to_stop:
                    self._stop(request_id)
                for event in done.events:
                    self._deliver(event)
            except Exception:  # noqa: BLE001 - a delivery failed: keep serving the other requests
                log.exception("processing the engine's outputs failed")
