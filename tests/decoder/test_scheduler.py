"""The scheduler and block manager with hand-built requests: no torch, no model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.decoder.engine.block_manager import BlockManager
from services.decoder.engine.request import ImageSpan, Request, RequestStatus
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.engine.scheduler import Scheduler, SchedulerLimits

BS = 4


def req(
    rid, n_prompt=10, max_tokens=8, priority=0, arrival=0.0, ns="", images=(), tokens=None, deadline=None
):
    ids = tokens or [(7 * i + sum(map(ord, rid))) % 50 + 10 for i in range(n_prompt)]
    return Request(
        rid,
        ids,
        SamplingParams(temperature=0.0),
        max_tokens,
        eos_token_ids=frozenset({2}),
        images=list(images),
        cache_namespace=ns,
        priority=priority,
        arrival_time=arrival,
        deadline=deadline,
    )


def sched(num_blocks=64, budget=32, max_seqs=8, max_len=256, chunked=True, prefix=True, clock=lambda: 0.0):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix)
    return Scheduler(SchedulerLimits(max_seqs, budget, max_len, chunked), bm, clock=clock)


def step(s: Scheduler, token=5):
    out = s.schedule()
    sampled = [token for c in out.chunks if c.sample]
    return out, s.update_from_output(out, sampled)


def test_scheduler_never_imports_torch():
    code = (
        "import sys; import services.decoder.engine.scheduler, services.decoder.engine.block_manager, "
        "services.decoder.types, services.decoder.config; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_chunked_prefill_then_decode_in_one_budget():
    s = sched(budget=8)
    s.add_request(req("a", n_prompt=20))
    out, ups = step(s)
    assert [(c.start, c.num_tokens, c.sample) for c in out.chunks] == [(0, 8, False)]
    assert ups == []
    out, _ = step(s)
    out, ups = step(s)  # 16..20: the last chunk samples
    assert [(c.start, c.num_tokens, c.sample) for c in out.chunks] == [(16, 4, True)]
    assert ups[0].new_token_ids == [5]
    s.add_request(req("b", n_prompt=12))
    out, _ = step(s)
    # the decode of "a" (1 token) and 7 prompt tokens of "b" share the budget
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_budget():
    s = sched(budget=8, chunked=False)
    s.add_request(req("a", n_prompt=6))
    s.add_request(req("b", n_prompt=6))
    out, _ = step(s)
    assert [c.request.request_id for c in out.chunks] == ["a"]


def test_max_tokens_and_eos_finish_and_free_blocks():
    s = sched()
    s.add_request(req("a", max_tokens=3))
    s.add_request(req("b", max_tokens=10))
    for _ in range(3):
        step(s)
    assert s.requests.keys() == {"b"}
    out, ups = step(s, token=2)  # eos
    assert ups[0].finished and ups[0].request.status == RequestStatus.FINISHED_STOPPED
    assert s.block_manager.num_free_blocks == 64


def test_ignore_eos_and_stop_token_ids():
    s = sched()
    r = req("a", max_tokens=5)
    r.sampling_params.ignore_eos = True
    r.sampling_params.stop_token_ids = [9]
    s.add_request(r)
    _, ups = step(s, token=2)
    assert not ups[0].finished
    _, ups = step(s, token=9)
    assert ups[0].finished and r.status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_ends_with_length():
    s = sched(max_len=12)
    s.add_request(req("a", n_prompt=10, max_tokens=100))
    step(s)
    _, ups = step(s)
    assert ups[0].finished and ups[0].request.status == RequestStatus.FINISHED_LENGTH
    assert ups[0].request.num_tokens == 12


def test_preemption_by_recompute_when_blocks_run_out():
    # 2 requests of 8 prompt tokens = 2 blocks each; 5 blocks: the second one to grow gets preempted
    s = sched(num_blocks=5, prefix=False)
    s.add_request(req("a", n_prompt=8, max_tokens=8, arrival=0.0))
    s.add_request(req("b", n_prompt=8, max_tokens=8, arrival=1.0))
    step(s)  # both prefilled, 4 blocks used
    out, _ = step(s)  # both feed their 9th token: 3 blocks each > 5
    assert [r.request_id for r in out.preempted] == ["b"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_output_tokens == 1  # its sampled token is kept and will be recomputed
    while "a" in s.requests:
        step(s)
    out, _ = step(s)  # b comes back: prompt and output recomputed in one chunk
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 0, 9)]


def test_priority_orders_admission_and_preempts_lower():
    s = sched(num_blocks=6, max_seqs=8, budget=64, prefix=False)
    s.add_request(req("low", n_prompt=16, max_tokens=4, priority=0, arrival=0.0))
    step(s)  # low holds 5 blocks
    s.add_request(req("high", n_prompt=8, max_tokens=4, priority=5, arrival=1.0))
    out, _ = step(s)
    assert [r.request_id for r in out.preempted] == ["low"]
    assert [c.request.request_id for c in out.chunks] == ["high"]
    # among waiting requests, higher priority is admitted first regardless of arrival
    s2 = sched(max_seqs=1)
    s2.add_request(req("first", arrival=0.0))
    s2.add_request(req("urgent", arrival=1.0, priority=3))
    out, _ = step(s2)
    assert [c.request.request_id for c in out.chunks] == ["urgent"]


def test_abort_frees_blocks_immediately():
    s = sched()
    s.add_request(req("a", n_prompt=30))
    step(s)
    assert s.block_manager.num_free_blocks < 64
    r = s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert r.status.finish_reason == "cancelled"
    assert s.block_manager.num_free_blocks == 64 and not s.has_unfinished


def test_deadline_expires_waiting_and_running():
    now = [0.0]
    s = sched(clock=lambda: now[0], max_seqs=1)
    s.add_request(req("a", deadline=5.0))
    s.add_request(req("b", deadline=3.0))
    step(s)
    now[0] = 4.0
    out, _ = step(s)
    assert [r.request_id for r in out.finished] == ["b"]
    now[0] = 6.0
    out, _ = step(s)
    assert [r.request_id for r in out.finished] == ["a"] and out.finished[
        0
    ].status.finish_reason == "deadline"
    assert s.block_manager.num_free_blocks == 64


def test_prefix_cache_reuses_blocks_within_a_namespace_only():
    s = sched()
    tokens = list(range(10, 30))
    s.add_request(req("a", tokens=tokens, max_tokens=1))
    step(s)
    assert "a" not in s.requests  # done; its blocks are free but still hashed
    s.add_request(req("b", tokens=tokens + [99], max_tokens=1))
    out, _ = step(s)
    assert out.chunks[0].start == 20 and s.block_manager.prefix_hits == 20
    s.add_request(req("c", tokens=tokens + [99], max_tokens=1, ns="other"))
    out, _ = step(s)
    assert out.chunks[0].start == 0


def test_prefix_cache_keys_on_image_content():
    tokens = [10] * 4 + [3] * 8 + [11] * 4  # 8 identical image-context tokens at offset 4
    s = sched()
    s.add_request(req("a", tokens=tokens, max_tokens=1, images=[ImageSpan(4, 8, "cat")]))
    step(s)
    s.add_request(req("b", tokens=tokens + [1], max_tokens=1, images=[ImageSpan(4, 8, "dog")]))
    out, _ = step(s)
    assert out.chunks[0].start == 4  # only the block before the image is shared
    s.add_request(req("c", tokens=tokens + [1], max_tokens=1, images=[ImageSpan(4, 8, "cat")]))
    out, _ = step(s)
    assert out.chunks[0].start == 16


def test_fully_cached_prompt_still_computes_its_last_token():
    s = sched()
    tokens = list(range(10, 26))  # exactly 4 blocks
    s.add_request(req("a", tokens=tokens, max_tokens=1))
    step(s)
    s.add_request(req("b", tokens=tokens, max_tokens=1))
    out, _ = step(s)
    assert (out.chunks[0].start, out.chunks[0].num_tokens, out.chunks[0].sample) == (12, 4, True)


def test_block_manager_lru_keeps_freed_prefixes_until_needed():
    bm = BlockManager(4, BS)
    a = req("a", tokens=list(range(10, 18)))
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_computed_blocks(a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = req("b", tokens=list(range(10, 18)) + [1])
    hits, n = bm.get_computed_blocks(b)
    assert n == 8 and hits == a.block_ids or len(hits) == 2
    big = req("big", tokens=list(range(100, 116)))
    assert bm.allocate_slots(big, 16)  # needs every block: the cached ones are evicted
    assert bm.get_computed_blocks(b)[1] == 0
    assert not bm.allocate_slots(req("x", n_prompt=4), 4)


def test_request_larger_than_the_cache_is_refused():
    s = sched(num_blocks=4)
    with pytest.raises(ValueError):
        s.add_request(req("huge", n_prompt=20, max_tokens=8))
