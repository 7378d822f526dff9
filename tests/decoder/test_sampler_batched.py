"""The batched sampler on its own: draws against the exact target distributions (chi-square), greedy and
seeded rows exactly, penalties and logprobs against straightforward per-row references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.decoder.engine.penalties import TokenCounts
from services.decoder.engine.request import Request
from services.decoder.engine.sampler import Sampler
from services.decoder.engine.sampling_params import SamplingParams

ALPHA = 1e-3  # the draws are seeded, so each test is deterministic; alpha bounds a wrong distribution
PROBS = [0.22, 0.17, 0.13, 0.11, 0.09, 0.08, 0.06, 0.05, 0.04, 0.03, 0.015, 0.005]
LOGITS = torch.tensor(PROBS, dtype=torch.float32).log()


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): 1 - the regularized lower incomplete gamma P(df/2, x/2)."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    term = total = 1.0 / a
    n = 0
    while term > total * 1e-16:
        n += 1
        term *= z / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a)) * total)


def test_chi2_sf_matches_the_tables():
    for x, df, p in [(3.841459, 1, 0.05), (24.321886, 7, 0.001), (19.675138, 11, 0.05), (31.264, 11, 0.001)]:
        assert math.isclose(chi2_sf(x, df), p, rel_tol=1e-3)


def target(params: SamplingParams, logits: torch.Tensor = LOGITS) -> list[float]:
    """The distribution a sampled row must follow, computed in float64 the plain way."""
    z = [float(v) / params.temperature for v in logits.double()]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order)
    if 0 < params.top_k < len(z):
        kth = z[order[params.top_k - 1]]
        keep = {i for i in keep if z[i] >= kth}
    m = max(z)
    weights = {i: math.exp(z[i] - m) for i in keep}
    if params.top_p < 1.0:
        total, before, kept = sum(weights.values()), 0.0, {}
        for i in (i for i in order if i in weights):
            assert abs(before / total - params.top_p) > 1e-3, "a top-p boundary too close to call"
            if before / total >= params.top_p:
                break
            kept[i] = weights[i]
            before += weights[i]
        weights = kept
    total = sum(weights.values())
    return [weights.get(i, 0.0) / total for i in range(len(z))]


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    """The p-value of ``counts`` under ``probs``; cells expected below 5 pooled; drawn outside the
    support fails at once."""
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probs, strict=True) if p == 0.0), (counts, probs)
    cells, pooled_c, pooled_e = [], 0, 0.0
    for c, p in zip(counts, probs, strict=True):
        if p == 0.0:
            continue
        if n * p < 5:
            pooled_c, pooled_e = pooled_c + c, pooled_e + n * p
        else:
            cells.append((c, n * p))
    if pooled_e:
        cells.append((pooled_c, pooled_e))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    return chi2_sf(stat, len(cells) - 1)


def draw_counts(
    make_params, rows: int = 4000, calls: int = 4, seed: int = 0, steps=None
) -> dict[int, list[int]]:
    """Counts per row kind: each call samples ``rows`` rows of LOGITS, row ``i`` with ``make_params(i)``,
    grouped by ``make_params(i)``'s position in the call's distinct kinds."""
    sampler = Sampler(torch.device("cpu"), seed=seed)
    counts: dict[int, list[int]] = {}
    for c in range(calls):
        params = [make_params(c * rows + i) for i in range(rows)]
        reqs = [Request(f"r{c}-{i}", [1], p, 8) for i, p in enumerate(params)]
        if steps is not None:
            for i, req in enumerate(reqs):
                req.all_token_ids += [0] * steps(c * rows + i)  # the row's step: tokens generated so far
        out = sampler(LOGITS.expand(rows, -1).clone(), reqs)
        for i, tok in enumerate(out.token_ids):
            counts.setdefault(kind_of(params[i]), [0] * len(PROBS))[tok] += 1
    return counts


def kind_of(p: SamplingParams) -> tuple:
    return (p.temperature, p.top_k, p.top_p)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.8),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_k=8, top_p=0.8),
    ],
    ids=lambda p: f"T={p.temperature},k={p.top_k},p={p.top_p}",
)
def test_unseeded_draws_follow_the_target_distribution(params):
    (counts,) = draw_counts(lambda i: params).values()
    assert chi_square_p(counts, target(params)) > ALPHA, (counts, target(params))


def test_seeded_draws_follow_the_target_distribution_across_seeds_and_steps():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    (across_seeds,) = draw_counts(lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=i)).values()
    assert chi_square_p(across_seeds, target(params)) > ALPHA, across_seeds
    (across_steps,) = draw_counts(
        lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=7), rows=1000, steps=lambda i: i
    ).values()
    assert chi_square_p(across_steps, target(params)) > ALPHA, across_steps


def test_a_mixed_batch_draws_each_row_from_its_own_distribution():
    kinds = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.9, seed=None, top_k=3, top_p=0.95),
    ]

    def make(i: int) -> SamplingParams:
        p = kinds[i % len(kinds)]
        seed = i if i % 3 == 0 else None  # seeded and unseeded rows of every kind
        return SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seed)

    counts = draw_counts(make)
    for p in kinds:
        got = counts[kind_of(p)]
        assert chi_square_p(got, target(p)) > ALPHA, (p, got)


def test_greedy_rows_in_a_sampled_batch_take_the_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 300, generator=g) * 4
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.5, top_p=0.5, seed=3),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=2.0, top_k=10),
        SamplingParams(temperature=0.0, top_p=0.3),
        SamplingParams(temperature=1.0, seed=9),
        SamplingParams(temperature=0.0, top_k=50),
    ]
    reqs = [Request(f"g{i}", [1, 2], p, 4) for i, p in enumerate(params)]
    out = Sampler(torch.device("cpu"))(logits.clone(), reqs)
    argmax = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            assert out.token_ids[i] == argmax[i]


def step_logits(request_id: str, step: int, vocab: int = 500) -> torch.Tensor:
    """The logits a request sees at a step: a function of the request and the step only."""
    seed = (sum(map(ord, request_id)) * 1000 + step) % (2**31)
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def generate(rows: list[tuple[str, SamplingParams]], steps: int = 12, seed: int = 0) -> dict[str, list[int]]:
    """Sample ``steps`` tokens for each row together, appending them as the scheduler does."""
    sampler = Sampler(torch.device("cpu"), seed=seed)
    reqs = [Request(rid, [5, 6, 7], p, steps) for rid, p in rows]
    for step in range(steps):
        logits = torch.stack([step_logits(rid, step) for rid, _ in rows])
        for req, tok in zip(reqs, sampler(logits, reqs).token_ids, strict=True):
            req.append_output_token(tok)
    return {r.request_id: r.output_token_ids for r in reqs}


def test_a_seeded_row_is_the_same_alone_in_a_mixed_batch_and_anywhere_in_it():
    seeded = ("s", SamplingParams(temperature=1.2, top_p=0.95, seed=4242, repetition_penalty=1.3))
    others = [
        ("a", SamplingParams(temperature=1.0)),
        ("b", SamplingParams(temperature=0.0)),
        ("c", SamplingParams(temperature=0.7, top_k=20, seed=5)),
        ("d", SamplingParams(temperature=1.5, frequency_penalty=1.0, logprobs=3)),
    ]
    alone = generate([seeded])["s"]
    assert alone == generate([seeded], seed=99)["s"]  # the engine's generator plays no part
    assert alone == generate([*others, seeded])["s"]
    assert alone == generate([others[0], seeded, *others[1:]])["s"]
    assert alone == generate([seeded, *others[::-1]], seed=5)["s"]
    other_seed = ("s", SamplingParams(temperature=1.2, top_p=0.95, seed=4243, repetition_penalty=1.3))
    assert generate([other_seed])["s"] != alone
    greedy = generate([("s", SamplingParams(temperature=0.0, repetition_penalty=1.3))])["s"]
    assert alone != greedy


def reference_penalties(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """The per-row rule written plainly: a set of every token seen, a count of the output tokens."""
    p, row = req.sampling_params, logits.clone()
    seen = torch.tensor(sorted(set(req.all_token_ids)))
    score = row[seen]
    row[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    counts = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.long), minlength=row.shape[0])
    counts = counts.to(row.dtype)
    return row - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype))


def test_penalties_equal_the_plain_per_row_rule_on_random_inputs():
    rng = random.Random(3)
    vocab, counts = 64, TokenCounts(torch.device("cpu"))
    live: list[Request] = []
    for step in range(30):
        if step % 3 == 0 or not live:  # requests come and go, so rows are freed and reused
            if len(live) > 10:
                counts.release(live.pop(rng.randrange(len(live))).request_id)
            params = SamplingParams(
                repetition_penalty=rng.choice([1.0, 0.7, 1.5]),
                frequency_penalty=rng.uniform(-2, 2),
                presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            )
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            live.append(Request(f"p{step}", prompt, params, 100))
        logits = torch.randn(len(live), vocab, generator=torch.Generator().manual_seed(step)) * 3
        got = counts.apply(logits, live)
        want = torch.stack([reference_penalties(logits[i], r) for i, r in enumerate(live)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for req in live:
            for _ in range(rng.choice([1, 1, 1, 3])):  # mostly one token a step, sometimes more
                req.append_output_token(rng.randrange(vocab))
    assert len(counts.rows) == len(live) and counts.output.shape[0] >= len(live)


def test_logprobs_of_a_mixed_batch_match_each_rows_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 200, generator=g) * 2
    asks = [None, 0, 3, None, 5, 1]
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.9, logprobs=k, repetition_penalty=1.4, seed=i)
        for i, k in enumerate(asks)
    ]
    reqs = [Request(f"l{i}", [i, i + 1, 3], p, 4) for i, p in enumerate(params)]
    out = Sampler(torch.device("cpu"))(logits.clone(), reqs)
    for i, k in enumerate(asks):
        lp = out.logprobs[i]
        if k is None:
            assert lp is None
            continue
        expected = torch.log_softmax(logits[i], dim=-1)  # before penalties, temperature and filters
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == float(expected[lp.token_id])
        vals, ids = expected.topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t.token_id for t in lp.top] == ids.tolist()
        assert [t.logprob for t in lp.top] == vals.tolist()


def test_top_k_keeps_the_ties_with_the_kth_logit_with_or_without_top_p():
    logits = torch.tensor([3.0, 1.0, 1.0, 0.0, -1.0])
    only_k = SamplingParams(temperature=1.0, top_k=2)
    with_p = SamplingParams(temperature=1.0, top_k=2, top_p=0.999)
    params = [only_k, with_p] * 500  # both filter paths in one batch
    reqs = [Request(f"t{i}", [1], p, 4) for i, p in enumerate(params)]
    out = Sampler(torch.device("cpu"))(logits.expand(len(reqs), -1).clone(), reqs)
    assert set(out.token_ids[0::2]) == {0, 1, 2}
    assert set(out.token_ids[1::2]) == {0, 1, 2}
