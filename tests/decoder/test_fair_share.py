"""Weighted fair share between tenants in the decoder's scheduler: hand-built requests, an injected
clock, no model. Each figure is counted from the scheduler's own output."""

from __future__ import annotations

import itertools

import pytest

from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.request import Request
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.engine.scheduler import Scheduler, SchedulerLimits, SchedulerOutput

BS = 4
_ids = itertools.count()


def treq(tenant, n_prompt=8, max_tokens=6, priority=0, weight=1.0, arrival=0.0, max_kv_share=None, rid=None):
    rid = rid or f"{tenant}{next(_ids)}"
    return Request(
        rid,
        [(7 * i + sum(map(ord, rid))) % 50 + 10 for i in range(n_prompt)],
        SamplingParams(temperature=0.0),
        max_tokens,
        eos_token_ids=frozenset({2}),
        priority=priority,
        arrival_time=arrival,
        tenant=tenant,
        weight=weight,
        max_kv_share=max_kv_share,
    )


def fsched(
    fair=True, num_blocks=256, budget=64, max_seqs=4, clock=lambda: 0.0, max_wait_s=30.0, prefix=False
):
    limits = SchedulerLimits(max_seqs, budget, 256, True, fair_share=fair, max_wait_s=max_wait_s)
    return Scheduler(limits, BlockManager(num_blocks, BS, enable_prefix_caching=prefix), clock=clock)


def step(s: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    """One step; also the requests it admitted (running now, not running before it)."""
    before = {r.request_id for r in s.running}
    out = s.schedule()
    admitted = [c.request for c in out.chunks if c.request.request_id not in before]
    s.update_from_output(out, [5 for c in out.chunks if c.sample])
    return out, admitted


def flood_then_one(fair: bool, num_blocks: int, max_seqs: int) -> tuple[int, int]:
    """A sends 3 x max_num_seqs requests, then B one: the steps B waits for admission and how many A
    requests are admitted while it waits."""
    s = fsched(fair, num_blocks=num_blocks, max_seqs=max_seqs)
    for k in range(3 * max_seqs):
        s.add_request(treq("A", arrival=k, max_tokens=12))
    for _ in range(3):
        step(s)
    assert {r.tenant for r in s.running} == {"A"} and s.num_waiting() > 0
    s.add_request(treq("B", arrival=100.0, rid="b"))
    a_ahead = 0
    for waited in range(1, 200):
        _, admitted = step(s)
        ids = [r.request_id for r in admitted]
        a_ahead += sum(1 for r in admitted[: ids.index("b") if "b" in ids else None] if r.tenant == "A")
        if "b" in ids:
            return waited, a_ahead
    raise AssertionError("B was never admitted")


@pytest.mark.parametrize("bound", ["slots", "blocks"])
def test_a_single_request_is_not_queued_behind_another_tenants_flood(bound):
    # slots: max_num_seqs binds; blocks: 12 KV blocks hold 2 of A's requests of up to 5 blocks
    num_blocks, max_seqs = (256, 4) if bound == "slots" else (12, 16)
    waited, a_ahead = flood_then_one(True, num_blocks, max_seqs)
    assert a_ahead == 0
    assert waited <= (1 if bound == "slots" else 2)


def test_without_fair_share_the_flood_goes_first():
    waited, a_ahead = flood_then_one(False, 256, 4)
    assert a_ahead == 8 and waited > 1  # the old order: every earlier A request, then B


def saturate(weights: dict[str, float], steps: int, **kw) -> dict[str, int]:
    """Tenants that always have work waiting: tokens computed per tenant over ``steps`` steps."""
    s = fsched(**kw)
    tokens = dict.fromkeys(weights, 0)
    for k in range(steps):
        for tenant, w in weights.items():
            while sum(1 for r in s.waiting if r.tenant == tenant) < 2 * s.limits.max_num_seqs:
                s.add_request(treq(tenant, n_prompt=6 + k % 7, max_tokens=5 + k % 11, weight=w, arrival=k))
        out, _ = step(s)
        for c in out.chunks:
            tokens[c.request.tenant] += c.num_tokens
    return tokens


@pytest.mark.parametrize(
    "limits",
    [
        {"max_seqs": 8, "budget": 256},  # slots bind
        {"max_seqs": 32, "budget": 24},  # the token budget binds
        {"max_seqs": 32, "budget": 256, "num_blocks": 40},  # KV blocks bind
    ],
)
def test_weights_3_to_1_share_the_tokens_3_to_1(limits):
    tokens = saturate({"A": 3.0, "B": 1.0}, 600, **limits)
    share = tokens["A"] / (tokens["A"] + tokens["B"])
    assert 0.70 <= share <= 0.80, (share, tokens)


def test_without_fair_share_weights_do_nothing():
    tokens = saturate({"A": 3.0, "B": 1.0}, 300, fair=False, max_seqs=8)
    assert abs(tokens["A"] / sum(tokens.values()) - 0.5) <= 0.05  # arrival order: even arrivals, even shares


def test_priority_is_strict_until_the_wait_bound():
    now = [0.0]
    s = fsched(clock=lambda: now[0], max_wait_s=10.0, max_seqs=2)
    s.add_request(treq("low", priority=0, rid="low"))
    admitted_at = None
    for _ in range(40):
        while sum(1 for r in s.waiting if r.tenant == "high") < 4:
            s.add_request(treq("high", priority=5, arrival=now[0]))
        _, admitted = step(s)
        if any(r.request_id == "low" for r in admitted):
            admitted_at = now[0]
            break
        now[0] += 1.0
    assert admitted_at == 10.0  # not before: the classes are strict; at the bound: it is served
    assert s.requests["low"].starved


def test_without_fair_share_a_low_priority_request_starves():
    now = [0.0]
    s = fsched(fair=False, clock=lambda: now[0], max_wait_s=10.0, max_seqs=2)
    s.add_request(treq("low", priority=0, rid="low"))
    for _ in range(40):
        while sum(1 for r in s.waiting if r.tenant == "high") < 4:
            s.add_request(treq("high", priority=5, arrival=now[0]))
        _, admitted = step(s)
        assert all(r.request_id != "low" for r in admitted)
        now[0] += 1.0


def test_max_kv_share_caps_a_tenants_blocks():
    s = fsched(num_blocks=64, max_seqs=32)
    cap = 16  # 0.25 of 64
    for k in range(40):
        s.add_request(treq("A", arrival=k, max_tokens=12, max_kv_share=0.25))
    peak = 0
    while s.has_unfinished:
        step(s)
        peak = max(peak, sum(len(r.block_ids) for r in s.running))
        assert peak <= cap
    assert peak >= cap - 5  # the cap binds: requests of 5 blocks at most, 3 of them fit
    with pytest.raises(ValueError, match="max_kv_share"):
        s.add_request(treq("A", n_prompt=60, max_tokens=8, max_kv_share=0.25))


def test_max_kv_share_leaves_room_for_another_tenant():
    s = fsched(num_blocks=64, max_seqs=32)
    for k in range(40):
        s.add_request(treq("A", arrival=k, max_tokens=12, max_kv_share=0.5))
    for _ in range(3):
        step(s)
    s.add_request(treq("B", rid="b"))
    out, admitted = step(s)
    assert [r.request_id for r in admitted] == ["b"]
    assert {r.tenant for r in out.preempted} <= {"A"}  # A's own growth over its cap, never for B
    assert sum(len(r.block_ids) for r in s.running if r.tenant == "A") <= 32


@pytest.mark.parametrize("fair, victim", [(True, "a3"), (False, "c1")])
def test_preemption_takes_the_tenant_furthest_over_its_share(fair, victim):
    # 9 blocks: A's three requests and C's one hold 2 each; all grow into a 3rd block at the next step
    s = fsched(fair, num_blocks=9, max_seqs=8)
    for k, (tenant, rid) in enumerate([("A", "a1"), ("A", "a2"), ("A", "a3"), ("C", "c1")]):
        s.add_request(treq(tenant, n_prompt=8, max_tokens=8, arrival=k, rid=rid))
    step(s)
    out, _ = step(s)
    assert [r.request_id for r in out.preempted] == [victim]


def test_greedy_tokens_are_the_same_with_fair_share_on_and_off(tiny_ckpt, reference):
    """Two tenants at 3:1 and one capped, in a batch of 2 and a small cache: fair share reorders
    admission and preemption, never a request's greedy tokens."""
    from services.decoder.engine.llm_engine import LLMEngine
    from tests.decoder.helpers import CASES, make_config, make_input, run, tokens_of

    tenants = [("a", 3.0, None), ("b", 1.0, None), ("c", 1.0, 0.75)]
    inputs = [
        make_input(f"r{k}", case, reference, tenant=t, weight=w, max_kv_share=cap)
        for k, (case, (t, w, cap)) in enumerate(zip(CASES * 2, itertools.cycle(tenants)))
    ]
    outcomes = {}
    for fair in (True, False):
        sched_cfg = {"fair_share": fair, "max_num_seqs": 2, "overlap": False}
        engine = LLMEngine(make_config(tiny_ckpt, cache={"num_blocks": 64}, scheduler=sched_cfg))
        try:
            events = run(engine, inputs, [0] * 4 + [1] * (len(inputs) - 4))
        finally:
            engine.shutdown()
        outcomes[fair] = {rid: (tokens_of(evs), evs[-1].finish_reason) for rid, evs in events.items()}
    assert outcomes[True] == outcomes[False]
    for k, case in enumerate(CASES):
        assert outcomes[True][f"r{k}"][0] == reference.generate(case)


@pytest.mark.parametrize("fair", [True, False])
def test_tenant_stats_count_admissions_ahead_of_a_waiting_tenant(fair):
    now = [0.0]
    s = fsched(fair, max_seqs=4, clock=lambda: now[0])
    for k in range(12):
        s.add_request(treq("A", arrival=k, max_tokens=12))
    step(s)
    now[0] = 1.0
    s.add_request(treq("B", arrival=100.0, rid="b-stats"))
    while "b-stats" not in {r.request_id for r in s.running}:
        now[0] += 0.5
        step(s)
    stats = s.tenant_stats()
    # on: B is admitted at the next step, no A request ahead of it; off: A's 8 waiting requests first
    assert stats["B"]["passed_over"] == (0 if fair else 8)
    assert stats["B"]["admissions"] == 1 and stats["B"]["queue_s"] == (0.5 if fair else now[0] - 1.0)
    assert stats["A"]["admissions"] >= 4 and stats["B"]["tokens"] == 8  # its prompt, prefilled
    assert stats["B"]["running"] == 1 and stats["B"]["kv_blocks"] == 2  # 8 tokens in 4-token blocks
    assert stats["A"]["kv_blocks"] == sum(len(r.block_ids) for r in s.running if r.tenant == "A")
