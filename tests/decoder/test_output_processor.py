"""Output processing on its own (no model): engine outputs in, events out; stop strings end a request
here and the engine's later outputs of it are dropped; the worker thread does not hold the engine up."""

from __future__ import annotations

import threading
import time

from services.decoder.engine.output_processor import EngineOutput, NewRequest, OutputProcessor, OutputWorker
from services.decoder.types import FinishReason, GenerationEvent
from tests.decoder.helpers import SlowTokenizer


def request(rid: str, stop: tuple[str, ...] = ()) -> NewRequest:
    return NewRequest(rid, True, stop, prompt_tokens=11, image_tokens=3)


def outputs(rid: str, ids: list[int], last: FinishReason | None = None) -> list[EngineOutput]:
    """One output a token; the last one ends the request with ``last`` (if given)."""
    outs = [EngineOutput(rid, [t], cached_prompt_tokens=4) for t in ids]
    if last is not None:
        outs[-1].finish_reason = last
    return outs


def run(processor: OutputProcessor, outs: list[EngineOutput]) -> tuple[list[GenerationEvent], list[str]]:
    events, to_stop = [], []
    for out in outs:
        done = processor.process([out])
        events += done.events
        to_stop += done.to_stop
    return events, to_stop


def test_events_carry_text_the_prompt_size_first_and_the_usage_last(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request(request("a"))
    ids = tokenizer("Hello, 世界", add_special_tokens=False)["input_ids"]
    events, to_stop = run(processor, outputs("a", ids, FinishReason.LENGTH))
    assert "".join(e.text for e in events) == "Hello, 世界" and not to_stop
    assert (events[0].prompt_tokens, events[0].image_tokens) == (11, 3)
    assert all(e.prompt_tokens is None for e in events[1:])
    last = events[-1]
    assert last.finish_reason == FinishReason.LENGTH
    assert (last.usage.completion_tokens, last.usage.cached_prompt_tokens) == (len(ids), 4)
    assert "a" not in processor.states


def test_a_stop_string_ends_the_request_and_later_outputs_are_dropped(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request(request("s", stop=("STOP",)))
    ids = tokenizer("the answer STOP and more", add_special_tokens=False)["input_ids"]
    k = next(n for n in range(1, len(ids) + 1) if "STOP" in tokenizer.decode(ids[:n]))
    events, to_stop = run(processor, outputs("s", ids, FinishReason.LENGTH))
    assert to_stop == ["s"]  # the engine must end it: it said nothing of an end yet
    assert len(events) == k and events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events) == "the answer "
    assert [t for e in events for t in e.token_ids] == ids[:k]
    assert events[-1].usage.completion_tokens == k  # the tokens after the stop string are not counted


def test_a_stop_string_on_the_last_token_reports_stop(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request(request("l", stop=("END",)))
    ids = tokenizer("the END", add_special_tokens=False)["input_ids"]
    events, to_stop = run(processor, outputs("l", ids, FinishReason.LENGTH))
    assert events[-1].finish_reason == FinishReason.STOP and not to_stop  # the engine ended it already
    assert "".join(e.text for e in events) == "the "


def test_an_end_of_sequence_token_gets_no_text(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request(request("e"))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    outs = outputs("e", [*tokenizer("ok", add_special_tokens=False)["input_ids"], eos], FinishReason.STOP)
    outs[-1].ended_by_token = True
    events, _ = run(processor, outs)
    assert "".join(e.text for e in events) == "ok" and events[-1].token_ids == [eos]


class BrokenTokenizer(SlowTokenizer):
    """A real tokenizer whose decode fails on one token id."""

    BAD = 77

    def decode(self, ids, **kw):
        if self.BAD in ids:
            raise ValueError("cannot decode")
        return super().decode(ids, **kw)


def test_a_failing_decode_ends_only_its_request(tokenizer):
    processor = OutputProcessor(BrokenTokenizer(tokenizer))
    processor.add_request(request("bad"))
    processor.add_request(request("good"))
    done = processor.process(
        [
            EngineOutput("bad", [BrokenTokenizer.BAD]),
            EngineOutput("good", [40], finish_reason=FinishReason.LENGTH),
        ]
    )
    bad, good = done.events
    assert bad.finish_reason == FinishReason.ERROR and "cannot decode" in bad.error
    assert done.to_stop == ["bad"]
    assert good.finish_reason == FinishReason.LENGTH and good.text == tokenizer.decode([40])


class SlowDecodes(SlowTokenizer):
    def decode(self, ids, **kw):
        time.sleep(0.01)
        return super().decode(ids, **kw)


def test_the_worker_does_not_hold_the_engine_up(tokenizer):
    """Handing a step's outputs over costs the engine thread nothing of their detokenisation, and each
    request's events arrive in order, the stop request before the last event."""
    delivered: list[GenerationEvent | str] = []
    finished = threading.Event()

    def deliver(event: GenerationEvent) -> None:
        delivered.append(event)
        if event.finished:
            finished.set()

    worker = OutputWorker(OutputProcessor(SlowDecodes(tokenizer)), deliver, stop=delivered.append)
    try:
        worker.add_request(request("w", stop=("STOP",)))
        ids = tokenizer("one two three four five six seven eight STOP nine", add_special_tokens=False)[
            "input_ids"
        ]
        start = time.perf_counter()
        for out in outputs("w", ids, FinishReason.LENGTH):
            worker.put([out])
        handed_over = time.perf_counter() - start
        assert finished.wait(10)
    finally:
        worker.close()
    assert handed_over < 0.01 * len(ids) / 4  # the decodes alone take 10 ms or more each
    assert delivered[-2] == "w" and delivered[-1].finish_reason == FinishReason.STOP
    events = delivered[:-2] + delivered[-1:]
    assert "".join(e.text for e in events) == "one two three four five six seven eight "
