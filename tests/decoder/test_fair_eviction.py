"""Prefix-cache eviction by fair share between tenants (``engine/free_queue.py``): the cached blocks of
the tenant furthest over its share of the cache go first. Hand-built requests on the block manager and
the scheduler (no torch), then the engine on the tiny checkpoint (greedy tokens unchanged)."""

from __future__ import annotations

import itertools

import pytest

from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.request import Request
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.engine.scheduler import Scheduler, SchedulerLimits

BS = 4
_ids = itertools.count()


def tenant_req(tenant: str, tokens: list[int], max_tokens: int = 1, weight: float = 1.0) -> Request:
    return Request(
        f"{tenant}{next(_ids)}",
        list(tokens),
        SamplingParams(temperature=0.0),
        max_tokens,
        eos_token_ids=frozenset({2}),
        cache_namespace=tenant,
        tenant=tenant,
        weight=weight,
    )


def prompt(k: int, n: int = 8) -> list[int]:
    """``n`` tokens of prompt number ``k``: distinct prompts share no block."""
    return [10 + (k * 31 + i * 7) % 90 for i in range(n)]


def run_and_free(bm: BlockManager, tenant: str, tokens: list[int], weight: float = 1.0) -> None:
    """A request of ``tenant`` computes ``tokens`` and ends: its full blocks stay cached, free."""
    r = tenant_req(tenant, tokens, weight=weight)
    computed, n_cached = bm.get_computed_blocks(r)
    assert bm.allocate_slots(r, len(tokens) - n_cached, computed)
    r.num_computed_tokens = len(tokens)
    bm.cache_computed_blocks(r)
    bm.free(r)


def cached_tokens(bm: BlockManager, tenant: str, tokens: list[int]) -> int:
    """How many of ``tokens`` a new request of ``tenant`` would find in the cache."""
    return bm.get_computed_blocks(tenant_req(tenant, [*tokens, 1]))[1]


@pytest.mark.parametrize("fair", [True, False])
def test_a_flood_of_distinct_prompts_evicts_its_own_prefixes_first(fair):
    bm = BlockManager(16, BS, fair_share=fair)
    run_and_free(bm, "B", prompt(0))  # B's prefix: 2 of the 16 blocks
    for k in range(1, 21):  # A's 20 distinct prompts need 40 blocks
        run_and_free(bm, "A", prompt(k))
    assert bm.num_free_blocks == 16
    assert cached_tokens(bm, "A", prompt(20)) == 8  # A's latest prefix stays
    assert cached_tokens(bm, "A", prompt(1)) == 0  # A's oldest is gone
    # on: A, over its share, evicted its own; off: least recently freed first, B's among them
    assert cached_tokens(bm, "B", prompt(0)) == (8 if fair else 0)
    assert bm.free_queue.blocks_of("B") == ((0, 2) if fair else (0, 16))  # off: one queue for all


@pytest.mark.parametrize("b_weight,evicted", [(8.0, "A"), (1.0, "B")])
def test_eviction_goes_by_blocks_per_weight(b_weight, evicted):
    bm = BlockManager(12, BS)
    run_and_free(bm, "B", prompt(0, 32), weight=b_weight)  # 8 blocks
    run_and_free(bm, "A", prompt(1, 16))  # 4 blocks, freed later
    run_and_free(bm, "C", prompt(2, 4))  # one block: evicted from the tenant furthest over its share
    # the tail of a sequence goes first, so the rest of its prefix still matches
    want = {"A": 16 - 4 * (evicted == "A"), "B": 32 - 4 * (evicted == "B")}
    assert cached_tokens(bm, "A", prompt(1, 16)) == want["A"]
    assert cached_tokens(bm, "B", prompt(0, 32)) == want["B"]


def test_blocks_held_by_running_requests_count_towards_the_share():
    bm = BlockManager(12, BS)
    run_and_free(bm, "B", prompt(0, 16))  # B: 4 cached blocks
    run_and_free(bm, "A", prompt(1, 8))  # A: 2 cached, freed later
    running = tenant_req("A", prompt(2, 24))
    assert bm.allocate_slots(running, 24)  # 6 blocks held: no free block without a hash is left
    assert bm.free_queue.blocks_of("A") == (6, 2)
    run_and_free(bm, "C", prompt(3, 4))  # A holds 8 in all, B 4: A's cached block goes
    assert cached_tokens(bm, "A", prompt(1, 8)) == 4 and cached_tokens(bm, "B", prompt(0, 16)) == 16


@pytest.mark.parametrize("fair", [True, False])
def test_scheduler_flood_keeps_the_other_tenants_prefix_with_fair_share(fair):
    limits = SchedulerLimits(4, 64, 256, True, fair_share=fair)
    s = Scheduler(limits, BlockManager(32, BS, fair_share=fair))

    def drain():
        for _ in range(200):
            if not s.has_unfinished:
                return
            out = s.schedule()
            s.update_from_output(out, [5 for c in out.chunks if c.sample])
        raise AssertionError("the scheduler did not finish")

    s.add_request(tenant_req("B", prompt(0, 12)))
    drain()
    for k in range(1, 13):  # A's flood: 12 distinct prompts of 3 blocks, 4 running at a time
        s.add_request(tenant_req("A", prompt(k, 12), max_tokens=4))
    drain()
    again = tenant_req("B", prompt(0, 12))
    s.add_request(again)
    out = s.schedule()
    assert out.chunks[0].request is again
    assert out.chunks[0].start == (8 if fair else 0)  # its 2 full blocks before the last token


def test_greedy_tokens_are_the_same_with_fair_eviction_on_and_off(tiny_ckpt, reference):
    """B's image prompt, then A's flood of other images overflows the cache, then B's prompt again:
    fair eviction keeps B's prefix (more cached prompt tokens), never changes a greedy token."""
    from services.decoder.engine.llm_engine import LLMEngine
    from tests.decoder.helpers import Case, make_config, make_input, run, tokens_of, user

    b_case = Case(user(None, "描述这张图片。"), [1], 6, namespace="B")
    cases = [("b1", "B", b_case)]
    cases += [(f"a{k}", "A", Case(user(None, "What is here?"), [k + 2], 6, namespace="A")) for k in range(4)]
    cases += [("b2", "B", b_case)]
    inputs = [make_input(rid, case, reference, tenant=t) for rid, t, case in cases]
    arrivals = [0, 20, 20, 20, 20, 100]
    outcomes, cached = {}, {}
    for fair in (True, False):
        sched_cfg = {"fair_share": fair, "max_num_seqs": 2, "overlap": False}
        engine = LLMEngine(make_config(tiny_ckpt, cache={"num_blocks": 80}, scheduler=sched_cfg))
        try:
            events = run(engine, inputs, arrivals)
        finally:
            engine.shutdown()
        outcomes[fair] = {rid: tokens_of(evs) for rid, evs in events.items()}
        cached[fair] = events["b2"][-1].usage.cached_prompt_tokens
    assert outcomes[True] == outcomes[False]
    for rid, _, case in cases:
        assert outcomes[True][rid] == reference.generate(case)
    assert cached[True] > cached[False], cached  # the flood evicted B's prefix only without fair share
