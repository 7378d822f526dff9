"""Overlapped scheduling: step N+1 is scheduled and launched before step N's tokens reach the host,
and every request gets exactly the tokens (and logprobs, and finish reasons) of the serial loop."""

from __future__ import annotations

import pytest

from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.request import PLACEHOLDER
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput
from tests.decoder.helpers import CASES, Case, make_config, make_input, run, tokens_of, user
from tests.decoder.test_scheduler import req, sched


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    made = {}

    def get(overlap: bool, cache: dict | None = None, scheduler: dict | None = None) -> LLMEngine:
        key = (overlap, repr(cache), repr(scheduler))
        if key not in made:
            sched = {**(scheduler or {}), "overlap": overlap}
            made[key] = LLMEngine(make_config(tiny_ckpt, cache=cache or {}, scheduler=sched))
        return made[key]

    yield get
    for eng in made.values():
        eng.shutdown()


def _mixed_inputs(reference) -> list[GenerateInput]:
    """Greedy, seeded, top-k/top-p, logprobs and a stop token, over text and image prompts."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, logprobs=3)
    inputs = [make_input(f"g{k}", case, reference) for k, case in enumerate(CASES)]
    inputs += [make_input(f"s{k}", case, reference, seeded) for k, case in enumerate(CASES[:4])]
    first = reference.generate(CASES[1])[3]  # greedy's 4th token of this case ends the request there
    stop = SamplingParams(temperature=0.0, stop_token_ids=[first], logprobs=0)
    inputs.append(make_input("stop", CASES[1], reference, stop))
    return inputs


def _outcome(events):
    """Tokens and finish reasons, exactly; logprobs rounded (a step's batch may differ in shape from
    the serial loop's, as a request ended by a stop token still fills its row in the step after)."""
    return {
        rid: (
            tokens_of(evs),
            evs[-1].finish_reason,
            [(lp.token_id, round(lp.logprob, 4)) for e in evs for lp in (e.logprobs or [])],
        )
        for rid, evs in events.items()
    }


def test_overlap_gives_the_serial_loop_tokens_exactly(engines, reference):
    inputs = _mixed_inputs(reference)
    arrivals = [k % 5 for k in range(len(inputs))]  # requests join while others decode
    serial = _outcome(run(engines(False), inputs, arrivals))
    overlapped = _outcome(run(engines(True), inputs, arrivals))
    assert overlapped == serial
    assert serial["stop"][1] == "stop" and len(serial["stop"][0]) == 4
    for k, case in enumerate(CASES):
        assert serial[f"g{k}"][0] == reference.generate(case)


def test_overlap_under_preemption_and_prefix_hits(engines, reference):
    """A cache too small for the batch preempts requests while their step runs; a repeated prompt
    hits the prefix cache. Tokens stay the serial loop's."""
    small = {"cache": {"num_blocks": 40}, "scheduler": {"max_model_len": 512, "max_num_batched_tokens": 1024}}
    cases = [Case(user(None, "描述这张图片。"), [1], 40), Case(user(None, "What color is the car?"), [5], 40)]
    inputs = [make_input(f"p{k}", cases[k % 2], reference) for k in range(4)]
    serial_eng, overlap_eng = engines(False, **small), engines(True, **small)
    serial = _outcome(run(serial_eng, inputs))
    preempted_before = overlap_eng.scheduler.num_preemptions
    overlapped = _outcome(run(overlap_eng, inputs))
    assert overlap_eng.scheduler.num_preemptions > preempted_before
    assert overlapped == serial
    assert overlap_eng.block_manager.num_free_blocks == overlap_eng.block_manager.num_blocks


def test_the_next_step_is_launched_before_this_one_resolves(engines):
    eng = engines(True)
    for k in range(3):
        eng.add_request(
            eng.make_request(
                GenerateInput(
                    request_id=f"o{k}",
                    messages=user(f"hi {k}"),
                    sampling=SamplingParams(temperature=0.0),
                    max_tokens=8,
                )
            )
        )
    eng.step_outputs()  # prefill launched: its first tokens are placeholders on the host
    launched = eng._pending
    assert launched is not None
    assert all(r.all_token_ids[-1] == PLACEHOLDER and r.num_pending == 1 for r in eng.scheduler.running)
    eng.step_outputs()  # the first decode is launched, reading those placeholders on the device
    scheduled, _ = eng._pending
    assert [c.num_tokens for c in scheduled.chunks] == [1, 1, 1]
    while eng.has_unfinished:
        eng.step()


def test_penalised_requests_run_in_series_with_the_same_tokens(engines, reference):
    """Penalties count a request's tokens on the host side of the launch: a batch with such a request
    resolves the step before (``SampleRow`` refuses a placeholder), and its tokens stay the serial's."""
    pen = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5)
    inputs = [make_input(f"r{k}", case, reference, pen) for k, case in enumerate(CASES[:3])]
    inputs.append(make_input("plain", CASES[3], reference))
    arrivals = [0, 2, 4, 1]
    assert _outcome(run(engines(True), inputs, arrivals)) == _outcome(run(engines(False), inputs, arrivals))


def test_abort_while_a_step_runs_frees_everything(engines):
    eng = engines(True)
    for k in range(2):
        eng.add_request(
            eng.make_request(
                GenerateInput(
                    request_id=f"a{k}",
                    messages=user("abort me"),
                    sampling=SamplingParams(temperature=0.0, ignore_eos=True),
                    max_tokens=30,
                )
            )
        )
    for _ in range(4):
        eng.step_outputs()
    assert eng._pending is not None
    eng.abort("a0")
    events = []
    while eng.has_unfinished:
        events += eng.step()
    assert all(e.request_id == "a1" for e in events)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


# -- the scheduler's half, without a model -------------------------------------------------------


def test_advance_puts_placeholders_and_resolve_fills_them():
    s = sched()
    s.add_request(req("a", n_prompt=6, max_tokens=3))
    first = s.schedule()
    s.advance(first)
    a = s.requests["a"]
    assert a.all_token_ids[-1] == PLACEHOLDER and a.num_computed_tokens == 6
    second = s.schedule()  # scheduled before the first step's token is known
    assert [(c.start, c.num_tokens) for c in second.chunks] == [(6, 1)]
    s.advance(second)
    assert s.resolve(first, [11])[0].new_token_ids == [11]
    assert a.all_token_ids[6:] == [11, PLACEHOLDER]
    ups = s.resolve(second, [12])
    assert a.output_token_ids == [11, 12] and not ups[0].finished
    third = s.schedule()
    s.advance(third)
    assert a.num_pending == 0  # its 3rd token ends it by length: no placeholder, nothing after it
    assert s.resolve(third, [13])[0].finished and a.output_token_ids == [11, 12, 13]


def test_a_stop_token_drops_the_step_already_launched():
    s = sched()
    s.add_request(req("a", n_prompt=6, max_tokens=8))
    first = s.schedule()
    s.advance(first)
    second = s.schedule()
    s.advance(second)
    ups = s.resolve(first, [2])  # eos
    assert ups[0].finished and s.requests == {}
    a = ups[0].request
    assert a.output_token_ids == [2] and a.num_pending == 0
    assert s.resolve(second, [9]) == []  # the extra step's token is dropped
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_a_request_preempted_while_its_step_runs_waits_for_its_token():
    s = sched(num_blocks=5, budget=64)
    s.add_request(req("a", n_prompt=8, max_tokens=4, priority=0))
    first = s.schedule()
    s.advance(first)
    s.add_request(req("b", n_prompt=12, max_tokens=4, priority=5))
    second = s.schedule()  # b preempts a, whose first token is still on the device
    a = first.chunks[0].request
    assert a in second.preempted or a.status.name == "PREEMPTED"
    assert a.num_pending == 1
    s.advance(second)
    third = s.schedule()
    assert all(c.request is not a for c in third.chunks)  # not prefilled with an unknown token
    s.resolve(first, [21])
    assert a.output_token_ids == [21] and a.num_pending == 0


def test_overlap_is_on_by_default_on_cuda_only(engine):
    """``scheduler.overlap`` "auto": on a CPU the engine thread would take a core from the forward."""
    assert engine.config.scheduler.overlap == "auto" and engine.overlap is False


def test_structured_rows_run_in_series_with_the_same_documents(engines):
    """A grammar's next mask needs the row's last token on the host: such a batch resolves the step
    before (``SampleRow`` refuses a placeholder), and every document is the serial loop's, valid."""
    from tests.decoder.test_structured import INVOICE, PERSON, check_valid, inp, schema_params

    inputs = [
        inp("inv", schema_params(INVOICE, temperature=0.0)),
        inp("per", schema_params(PERSON, temperature=0.8, seed=3), "Who are you?"),
        inp("free", SamplingParams(temperature=0.0, ignore_eos=True), "Tell me about the rain.", 24),
    ]
    arrivals = [0, 1, 0]
    serial = run(engines(False), inputs, arrivals)
    overlapped = run(engines(True), inputs, arrivals)
    assert _outcome(overlapped) == _outcome(serial)
    check_valid(overlapped["inv"], INVOICE)
    check_valid(overlapped["per"], PERSON)
