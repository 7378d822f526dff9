"""DecoderCore: asyncio streaming, cancellation, deadlines, priority and a free event loop, with the
engine in a process of its own (the default) and on a thread of the caller's process alike."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.decoder.engine.async_engine import DecoderCore
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput
from tests.decoder.helpers import CASES, Case, SlowTokenizer, make_config, make_input, tokens_of, user

LONG = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["process", "thread"])
def core(tiny_ckpt, request):
    c = DecoderCore(
        make_config(tiny_ckpt, cache={"num_blocks": 128}, engine_process=request.param == "process")
    )
    yield c
    c.shutdown()


async def collect(core, inp):
    return [e async for e in core.generate(inp)]


async def wait_idle(core, timeout=10.0):
    end = time.monotonic() + timeout
    while core.stats()["running"] or core.stats()["waiting"]:
        if time.monotonic() > end:
            raise TimeoutError(core.stats())
        await asyncio.sleep(0.01)


async def test_streams_tokens_text_and_usage(core, reference, tokenizer):
    case = CASES[0]
    events = await collect(core, make_input("c1", case, reference))
    assert tokens_of(events) == reference.generate(case)
    assert all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason in ("stop", "length")
    assert (last.usage.prompt_tokens, last.usage.image_tokens) == (len(reference.prompt_ids(case)), 256)
    assert "".join(e.text for e in events) == tokenizer.decode(tokens_of(events), skip_special_tokens=True)


async def test_concurrent_requests_match_their_references(core, reference):
    cases = CASES[:4]
    results = await asyncio.gather(
        *(collect(core, make_input(f"cc{i}", c, reference)) for i, c in enumerate(cases))
    )
    for case, events in zip(cases, results, strict=True):
        assert tokens_of(events) == reference.generate(case)


async def test_abort_frees_blocks_and_ends_the_stream(core, reference):
    inp = make_input("ab", Case(user("Talk for a long time."), [], 900), reference, LONG)
    events = []
    async for event in core.generate(inp):
        events.append(event)
        if len(events) == 3:
            core.abort("ab")
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].usage.completion_tokens >= 3
    await wait_idle(core)
    assert core.stats()["kv_usage"] == 0.0  # every block free again


async def test_closing_the_iterator_cancels(core, reference):
    inp = make_input("cl", Case(user("Talk for a long time."), [], 900), reference, LONG)
    stream = core.generate(inp)
    async for _ in stream:
        break
    await stream.aclose()
    await wait_idle(core)
    assert core.stats()["kv_usage"] == 0.0  # every block free again


async def test_deadline_ends_with_deadline(core, reference):
    inp = make_input(
        "dl", Case(user("Talk for a long time."), [], 900), reference, LONG, deadline=time.monotonic() + 0.3
    )
    events = await collect(core, inp)
    assert events[-1].finish_reason == "deadline"
    epoch = make_input(
        "dl2", Case(user("Talk."), [], 900), reference, LONG, deadline=time.time() - 1, deadline_is_epoch=True
    )
    events = await collect(core, epoch)
    assert events[-1].finish_reason == "deadline" and events[-1].usage.completion_tokens == 0


async def test_the_event_loop_stays_free(core, reference):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    await collect(core, make_input("free", Case(user("Talk for a while."), [], 60), reference, LONG))
    elapsed = time.monotonic() - start
    task.cancel()
    assert ticks >= elapsed / 0.005 * 0.3  # the loop kept ticking while steps ran


async def test_a_stop_string_ends_the_stream_and_the_request(core, reference, tokenizer):
    """The stop string is found beside the engine thread: the request may run a step more, whose token
    is neither emitted nor counted, and its blocks are freed."""
    case = Case(user("Tell me about the spring rain."), [], 40)
    full_events = await collect(core, make_input("full", case, reference, LONG))
    full_ids, full = tokens_of(full_events), "".join(e.text for e in full_events)
    stop = next(full[i : i + 3] for i in range(8, len(full)) if full[i : i + 3].strip() == full[i : i + 3])
    k = next(
        n
        for n in range(1, len(full_ids) + 1)
        if stop in tokenizer.decode(full_ids[:n], skip_special_tokens=True)
    )
    params = SamplingParams(temperature=0.0, ignore_eos=True, stop=[stop])
    events = await collect(core, make_input("stopped", case, reference, params))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert tokens_of(events) == full_ids[:k] and events[-1].usage.completion_tokens == k
    await wait_idle(core)
    assert core.stats()["kv_usage"] == 0.0  # every block free again


async def test_detokenisation_runs_beside_the_engine_thread(core, reference, tokenizer):
    processor = core.outputs.processor
    original = processor.tokenizer
    recording = processor.tokenizer = SlowTokenizer(original)
    try:
        events = await collect(core, make_input("threads", CASES[3], reference))
    finally:
        processor.tokenizer = original
    assert "".join(e.text for e in events) == tokenizer.decode(tokens_of(events), skip_special_tokens=True)
    assert recording.decoded and recording.threads == {"decoder-output"}


async def test_invalid_input_raises_before_streaming(core, reference):
    bad = GenerateInput("bad", user(None, "x"), images=[], max_tokens=4)
    with pytest.raises(InvalidArgument):
        await collect(core, bad)
    with pytest.raises(InvalidArgument):
        await collect(core, make_input("bad2", CASES[1], reference, SamplingParams(top_p=2.0)))


async def test_duplicate_request_ids_are_refused(core, reference):
    first = core.generate(make_input("dup", Case(user("Talk."), [], 200), reference, LONG))
    await first.__anext__()
    with pytest.raises(InvalidArgument):
        await collect(core, make_input("dup", CASES[1], reference))
    await first.aclose()
    await wait_idle(core)


def test_count_tokens(core, reference):
    assert core.count_tokens(CASES[0].messages, [1]) == (len(reference.prompt_ids(CASES[0])), 256)


@pytest.mark.parametrize("fair_share", [True, False])
def test_priority_runs_urgent_requests_first(tiny_ckpt, reference, fair_share):
    """Strict priority: with fair share (the default) an urgent request takes the one slot from a
    running, less urgent one (preempted, recomputed later); without it, it waits for the slot."""
    eng = LLMEngine(make_config(tiny_ckpt, scheduler={"max_num_seqs": 1, "fair_share": fair_share}))
    try:
        inputs = {
            "busy": make_input("busy", Case(user("a"), [], 4), reference, LONG),
            "low": make_input("low", Case(user("b"), [], 4), reference, LONG, priority=0),
            "high": make_input("high", Case(user("c"), [], 4), reference, LONG, priority=10),
        }
        eng.add_request(eng.make_request(inputs["busy"]))
        eng.step()
        eng.add_request(eng.make_request(inputs["low"]))  # arrives first, but less urgent
        eng.add_request(eng.make_request(inputs["high"]))
        finish_step, step = {}, 0
        while eng.has_unfinished:
            step += 1
            for e in eng.step():
                if e.finished:
                    finish_step[e.request_id] = step
        if fair_share:
            assert finish_step["high"] < finish_step["busy"] < finish_step["low"]
        else:
            assert finish_step["busy"] < finish_step["high"] < finish_step["low"]
    finally:
        eng.shutdown()


def test_kv_cache_that_cannot_fit_a_sequence_is_a_clear_error(tiny_ckpt):
    with pytest.raises(FailedPrecondition, match="max_model_len"):
        LLMEngine(make_config(tiny_ckpt, cache={"num_blocks": 8}, scheduler={"max_model_len": 1024}))


def test_block_size_is_validated_per_backend():
    from services.decoder.attention.flash import FlashAttnBackend
    from services.decoder.attention.registry import resolve_backend_name

    backend = object.__new__(FlashAttnBackend)  # validation needs no kernel
    with pytest.raises(InvalidArgument, match="256"):
        backend.validate_block_size(16)
    backend.validate_block_size(512)
    assert resolve_backend_name("auto", "cpu", 256) == "torch_paged"
    with pytest.raises(FailedPrecondition):
        resolve_backend_name("flash_attn", "cpu", 256)
