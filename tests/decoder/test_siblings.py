"""The sibling gate: the samples of one request (one ``prefix_group``) prefill their prompt once.
Hand-built requests on the real scheduler and block manager: no torch, no model."""

from __future__ import annotations

from services.decoder.engine.request import Request, RequestStatus
from services.decoder.engine.sampling_params import SamplingParams
from tests.decoder.test_scheduler import BS, sched, step

PROMPT = [(7 * i) % 50 + 10 for i in range(22)]  # 22 tokens: 5 full blocks of 4, then 2 tokens
SHAREABLE = (len(PROMPT) - 1) // BS * BS  # 20: every full block (the last token is always computed)


def sample(k: int, group: str | None = "r", tokens=PROMPT, max_tokens=6) -> Request:
    return Request(
        f"r-{k}",
        list(tokens),
        SamplingParams(temperature=1.0, seed=k),
        max_tokens,
        eos_token_ids=frozenset({2}),
        prefix_group=group,
    )


def chunks_of(out) -> dict[str, tuple[int, int]]:
    return {c.request.request_id: (c.start, c.num_tokens) for c in out.chunks}


def test_the_leader_prefills_and_the_siblings_take_its_blocks_from_the_cache():
    s = sched(budget=64)
    samples = [sample(k) for k in range(4)]
    for r in samples:
        s.add_request(r)
    out, _ = step(s)
    assert chunks_of(out) == {"r-0": (0, 22)}  # the siblings wait: the prompt is not cached yet
    assert all(r.status == RequestStatus.WAITING for r in samples[1:])
    hits_before = s.block_manager.prefix_hits
    out, _ = step(s)
    # the leader decodes; each sibling computes only the last, partial block of the prompt
    assert chunks_of(out) == {"r-0": (22, 1), **{f"r-{k}": (SHAREABLE, 22 - SHAREABLE) for k in (1, 2, 3)}}
    assert [r.num_cached_tokens for r in samples] == [0, SHAREABLE, SHAREABLE, SHAREABLE]
    assert s.block_manager.prefix_hits - hits_before == 3 * SHAREABLE
    assert s.policy.tokens[""] == 22 + 1 + 3 * (22 - SHAREABLE)  # prompt tokens computed: once, plus tails
    # the siblings share the leader's prompt blocks
    assert all(r.block_ids[:5] == samples[0].block_ids[:5] for r in samples[1:])
    while s.has_unfinished:
        step(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert s.siblings.groups == {}


def test_siblings_wait_through_a_chunked_prefill():
    s = sched(budget=8)
    for k in range(3):
        s.add_request(sample(k))
    seen = []
    for _ in range(3):  # 8 + 8 + 6 prompt tokens of the leader
        out, _ = step(s)
        seen.append(chunks_of(out))
    assert seen == [{"r-0": (0, 8)}, {"r-0": (8, 8)}, {"r-0": (16, 6)}]
    out, _ = step(s)
    assert chunks_of(out) == {"r-0": (22, 1), "r-1": (20, 2), "r-2": (20, 2)}


def test_overlapped_steps_admit_the_siblings_once_the_prefill_is_resolved():
    s = sched(budget=64)
    for k in range(3):
        s.add_request(sample(k))
    first = s.schedule()
    s.advance(first)  # launched: the prompt counts as computed, its blocks are not registered yet
    second = s.schedule()
    assert chunks_of(second) == {"r-0": (22, 1)}  # still held: nothing to find in the cache
    s.advance(second)
    s.resolve(first, [5])
    s.resolve(second, [6])
    third = s.schedule()
    assert chunks_of(third) == {"r-0": (23, 1), "r-1": (20, 2), "r-2": (20, 2)}


def test_without_prefix_caching_each_sample_prefills():
    s = sched(budget=128, prefix=False)
    for k in range(4):
        s.add_request(sample(k))
    out, _ = step(s)
    assert chunks_of(out) == {f"r-{k}": (0, 22) for k in range(4)}


def test_a_leader_ended_before_its_prompt_is_cached_holds_no_one():
    s = sched(budget=8)
    for k in range(3):
        s.add_request(sample(k))
    out, _ = step(s)
    assert chunks_of(out) == {"r-0": (0, 8)}
    s.finish_request("r-0", RequestStatus.FINISHED_ABORTED)
    out, _ = step(s)
    # a new leader: r-1 prefills (its first 8 tokens hit the blocks r-0 registered), r-2 waits for it
    assert chunks_of(out) == {"r-1": (8, 8)}
    assert s.siblings.groups == {"r": [s.requests["r-1"], s.requests["r-2"]]}


def test_other_groups_and_lone_requests_are_not_held():
    s = sched(budget=128)
    s.add_request(sample(0, group="a"))
    s.add_request(sample(1, group="b"))
    s.add_request(sample(2, group=None))
    out, _ = step(s)
    assert set(chunks_of(out)) == {"r-0", "r-1", "r-2"}


def test_a_prompt_shorter_than_a_block_has_nothing_to_share():
    s = sched(budget=64)
    for k in range(3):
        s.add_request(sample(k, tokens=[11, 12, 13]))
    out, _ = step(s)
    assert chunks_of(out) == {f"r-{k}": (0, 3) for k in range(3)}
