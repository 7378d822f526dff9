"""Every sampling parameter, logprobs, stop conditions and input validation, on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgument
from services.decoder.engine.sampling_params import SamplingParams
from tests.decoder.helpers import CASES, Case, make_input, run, text_of, tokens_of, user

TEXT_CASE = Case(user("Tell me about the spring rain."), [], 16)


def gen(engine, reference, sampling, case=TEXT_CASE, rid="q", **kw):
    return run(engine, [make_input(rid, case, reference, sampling, **kw)])[rid]


def manual_greedy(reference, case: Case, n: int, adjust) -> list[int]:
    """Greedy decoding with transformers' LM (no cache) and a logits adjustment ``adjust(logits, out)``."""
    lm, head = reference.model.model.language_model, reference.model.lm_head
    ids = reference.prompt_ids(case)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            hidden = lm(input_ids=torch.tensor([ids + out])).last_hidden_state
            logits = head(hidden[0, -1]).float()
            out.append(int(adjust(logits.clone(), out).argmax()))
    return out


def test_temperature_zero_is_greedy(engine, reference):
    assert tokens_of(gen(engine, reference, SamplingParams(temperature=0.0))) == reference.generate(TEXT_CASE)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=3),
        SamplingParams(temperature=1e-4, seed=3),
    ],
    ids=["top_k=1", "tiny top_p", "tiny temperature"],
)
def test_degenerate_sampling_equals_greedy(engine, reference, params):
    assert tokens_of(gen(engine, reference, params)) == reference.generate(TEXT_CASE)


def test_seed_is_reproducible_and_independent_of_the_batch(engine, reference):
    params = SamplingParams(temperature=1.5, seed=1234)
    alone = tokens_of(gen(engine, reference, params, rid="seed-a"))
    again = tokens_of(gen(engine, reference, SamplingParams(temperature=1.5, seed=1234), rid="seed-b"))
    others = [
        make_input(f"o{i}", c, reference, SamplingParams(temperature=1.0))
        for i, c in enumerate([CASES[1], CASES[3], CASES[6]])
    ]
    batched = run(
        engine,
        [make_input("seed-c", TEXT_CASE, reference, SamplingParams(temperature=1.5, seed=1234)), *others],
    )
    assert alone == again == tokens_of(batched["seed-c"])
    other_seed = tokens_of(gen(engine, reference, SamplingParams(temperature=1.5, seed=99), rid="seed-d"))
    assert other_seed != alone
    assert alone != reference.generate(TEXT_CASE)  # high temperature leaves the greedy path


def test_top_k_draws_stay_in_the_top_k(engine, reference):
    events = gen(engine, reference, SamplingParams(temperature=2.0, top_k=3, seed=7, logprobs=3))
    for lp in (lp for e in events for lp in e.logprobs):
        assert lp.token_id in [t.token_id for t in lp.top]


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> set[int]:
    from services.decoder.engine.request import Request
    from services.decoder.engine.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), seed=0)
    req = Request("u", [1, 2, 3], params, 8)
    return {sampler(logits[None].clone(), [req]).token_ids[0] for _ in range(n)}


def test_top_p_and_top_k_filters_on_known_distributions():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    assert _draws(SamplingParams(temperature=1.0), logits) == {0, 1, 2, 3}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5), logits) == {0, 1}  # 0.4 < 0.5 <= 0.7
    assert _draws(SamplingParams(temperature=1.0, top_p=0.75), logits) == {0, 1, 2}
    assert _draws(SamplingParams(temperature=1.0, top_k=2), logits) == {0, 1}
    assert _draws(SamplingParams(temperature=1.0, top_k=3, top_p=0.5), logits) == {0, 1}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    cold = _draws(SamplingParams(temperature=0.05, seed=1), logits, n=200)
    assert cold == {0}
    assert _draws(SamplingParams(temperature=5.0), logits, n=300) == {0, 1, 2, 3}


def test_repetition_penalty_matches_transformers(engine, reference):
    case = CASES[3]
    ids = torch.tensor([reference.prompt_ids(case)])
    with torch.no_grad():
        ref = reference.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=case.max_tokens,
            do_sample=False,
            repetition_penalty=1.8,
        )
    expected = ref[0, ids.shape[1] :].tolist()
    got = tokens_of(
        gen(engine, reference, SamplingParams(temperature=0.0, repetition_penalty=1.8), case=case)
    )
    assert got == expected
    assert got != reference.generate(case)


@pytest.mark.parametrize("kind", ["frequency", "presence"])
def test_frequency_and_presence_penalties(engine, reference, kind):
    case = Case(user("Repeat after me."), [], 12)
    value = 1.5

    def adjust(logits, out):
        counts = (
            torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            if out
            else torch.zeros_like(logits)
        )
        return logits - (value * counts if kind == "frequency" else value * (counts > 0).float())

    expected = manual_greedy(reference, case, case.max_tokens, adjust)
    params = SamplingParams(temperature=0.0, ignore_eos=True, **{f"{kind}_penalty": value})
    got = tokens_of(gen(engine, reference, params, case=case))
    assert got == expected
    assert got != manual_greedy(reference, case, case.max_tokens, lambda lg, out: lg)


def test_logprobs_with_alternatives_match_the_model(engine, reference):
    case = CASES[1]
    ids = torch.tensor([reference.prompt_ids(case)])
    with torch.no_grad():
        ref = reference.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=case.max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    events = gen(engine, reference, SamplingParams(temperature=0.0, logprobs=4), case=case)
    lps = [lp for e in events for lp in e.logprobs]
    assert len(lps) == len(ref.logits)
    for lp, logits in zip(lps, ref.logits, strict=True):
        expected = torch.log_softmax(logits[0].float(), -1)
        assert math.isclose(lp.logprob, float(expected[lp.token_id]), abs_tol=1e-4)
        vals, top_ids = expected.topk(4)
        assert [t.token_id for t in lp.top] == top_ids.tolist()
        assert all(
            math.isclose(a, b, abs_tol=1e-4)
            for a, b in zip((t.logprob for t in lp.top), vals.tolist(), strict=True)
        )
        assert lp.top[0].token_id == lp.token_id  # greedy picks the best
    assert gen(engine, reference, SamplingParams(temperature=0.0), case=case)[0].logprobs is None


def test_stop_token_ids_end_generation(engine, reference):
    ref = reference.generate(TEXT_CASE)
    stop_id = ref[3]
    events = gen(engine, reference, SamplingParams(temperature=0.0, stop_token_ids=[stop_id]))
    toks = tokens_of(events)
    assert toks == ref[: ref.index(stop_id) + 1]
    assert events[-1].finish_reason == "stop"


def test_stop_string_ends_generation_and_cuts_text(engine, reference, tokenizer):
    full = text_of(gen(engine, reference, SamplingParams(temperature=0.0, ignore_eos=True)))
    stop = full[5:8]
    assert stop and stop.strip()
    events = gen(engine, reference, SamplingParams(temperature=0.0, stop=[stop], ignore_eos=True))
    assert events[-1].finish_reason == "stop"
    assert text_of(events) == full[: full.index(stop)]


def test_max_tokens_ends_with_length(engine, reference):
    events = gen(
        engine,
        reference,
        SamplingParams(temperature=0.0, ignore_eos=True),
        case=Case(TEXT_CASE.messages, [], 5),
    )
    assert len(tokens_of(events)) == 5 and events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 5


def test_streamed_text_equals_decoding_all_tokens(engine, reference, tokenizer):
    events = gen(
        engine,
        reference,
        SamplingParams(temperature=1.0, seed=5, ignore_eos=True),
        case=Case(user("写一首诗"), [], 40),
    )
    assert text_of(events) == tokenizer.decode(tokens_of(events), skip_special_tokens=True)
    assert all(
        e.text.count("\ufffd") == 0 or i == len(events) - 1 or "\ufffd" in tokenizer.decode(tokens_of(events))
        for i, e in enumerate(events)
    )


@pytest.mark.parametrize(
    "sampling,max_tokens",
    [
        (SamplingParams(temperature=-1.0), 4),
        (SamplingParams(temperature=float("nan")), 4),
        (SamplingParams(temperature=1e9), 4),
        (SamplingParams(top_p=0.0), 4),
        (SamplingParams(top_k=-5), 4),
        (SamplingParams(repetition_penalty=0.0), 4),
        (SamplingParams(frequency_penalty=5.0), 4),
        (SamplingParams(presence_penalty=-3.0), 4),
        (SamplingParams(seed=-1), 4),
        (SamplingParams(logprobs=1000), 4),
        (SamplingParams(stop=[""]), 4),
        (SamplingParams(stop_token_ids=[10**9]), 4),
        (SamplingParams(), 0),
        (SamplingParams(), -3),
        (SamplingParams(), 10**9),
    ],
)
def test_absurd_values_are_invalid(engine, reference, sampling, max_tokens):
    inp = make_input("bad", Case(TEXT_CASE.messages, [], max_tokens), reference, sampling)
    with pytest.raises(InvalidArgument):
        engine.make_request(inp)


def test_prompt_past_the_context_is_invalid(engine, reference):
    long = Case(user("hello " * 2000), [], 4)
    with pytest.raises(InvalidArgument, match="context"):
        engine.make_request(make_input("long", long, reference))
    with pytest.raises(InvalidArgument):  # 4 images x 256 rows alone exceed 1024 positions
        engine.make_request(
            make_input("imgs", Case(user(None, None, None, None), [1, 2, 3, 4], 4), reference)
        )


def test_embedding_shape_must_match_tiles(engine, reference):
    inp = make_input("shape", CASES[0], reference)
    inp.images[0].tiles = 2
    with pytest.raises(InvalidArgument):
        engine.make_request(inp)
