"""Greedy fp32 tokens equal transformers' generate, whatever the batch composition.

Covered: one request alone; 8 different requests arriving staggered with chunked prefill; prefix-cache
hits; forced preemption; tensor-parallel size 2 (gloo) against size 1.
"""

from __future__ import annotations

import pytest

from services.decoder.engine.llm_engine import LLMEngine
from tests.decoder.helpers import CASES, Case, make_config, make_input, run, tokens_of, user


def test_one_request_alone(engine, reference):
    case = CASES[0]
    inp = make_input("alone", case, reference)
    assert engine.make_request(inp).prompt_token_ids == reference.prompt_ids(case)
    events = run(engine, [inp])["alone"]
    assert tokens_of(events) == reference.generate(case)
    last = events[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage.image_tokens == 256
    assert last.usage.prompt_tokens == len(reference.prompt_ids(case))
    assert last.usage.completion_tokens == len(reference.generate(case))


def test_staggered_requests_with_chunked_prefill(tiny_ckpt, reference):
    # a small token budget splits image prompts into chunks that share steps with other decodes
    eng = LLMEngine(
        make_config(
            tiny_ckpt, scheduler={"max_num_batched_tokens": 96}, cache={"enable_prefix_caching": False}
        )
    )
    try:
        inputs = [make_input(f"s{i}", case, reference) for i, case in enumerate(CASES)]
        events = run(eng, inputs, arrivals=[0, 1, 2, 4, 7, 9, 12, 20])
    finally:
        eng.shutdown()
    for i, case in enumerate(CASES):
        assert tokens_of(events[f"s{i}"]) == reference.generate(case), f"request {i}"


def test_prefix_cache_hits_keep_tokens(tiny_ckpt, reference):
    eng = LLMEngine(make_config(tiny_ckpt))
    try:
        first = Case(user(None, "描述这张图片。"), [1], 12)
        second = Case(user(None, "What is in the picture?"), [1], 12)
        other_tenant = Case(user(None, "What is in the picture?"), [1], 12, namespace="tenant-b")
        other_image = Case(user(None, "What is in the picture?"), [6], 12)
        ev1 = run(eng, [make_input("p1", first, reference)])["p1"]
        ev2 = run(eng, [make_input("p2", second, reference)])["p2"]
        ev3 = run(eng, [make_input("p3", other_tenant, reference)])["p3"]
        ev4 = run(eng, [make_input("p4", other_image, reference)])["p4"]
    finally:
        eng.shutdown()
    assert tokens_of(ev1) == reference.generate(first)
    assert tokens_of(ev2) == reference.generate(second)
    assert tokens_of(ev3) == reference.generate(other_tenant)
    assert tokens_of(ev4) == reference.generate(other_image)
    # the system prompt and the image are shared: most of the 300-token prompt hits the cache
    assert ev2[-1].usage.cached_prompt_tokens >= 256
    assert ev3[-1].usage.cached_prompt_tokens == 0  # another namespace never hits
    image_offset = reference.prompt_ids(other_image).index(reference.tokenizer.convert_tokens_to_ids("<img>"))
    assert ev4[-1].usage.cached_prompt_tokens <= image_offset + 1  # a different image stops the hit


def test_forced_preemption_keeps_tokens(tiny_ckpt, reference):
    # two ~290-token prompts take 38 of 40 blocks; their decodes cannot both grow: one is preempted
    eng = LLMEngine(
        make_config(
            tiny_ckpt,
            cache={"num_blocks": 40, "enable_prefix_caching": False},
            scheduler={"max_model_len": 512, "max_num_batched_tokens": 1024},
        )
    )
    try:
        cases = [
            Case(user(None, "描述这张图片。"), [1], 40),
            Case(user(None, "What color is the car?"), [5], 40),
        ]
        events = run(eng, [make_input(f"x{i}", c, reference) for i, c in enumerate(cases)])
        assert eng.scheduler.num_preemptions >= 1
        assert eng.block_manager.num_free_blocks == 40
    finally:
        eng.shutdown()
    for i, case in enumerate(cases):
        assert tokens_of(events[f"x{i}"]) == reference.generate(case)


@pytest.mark.slow
def test_tensor_parallel_two_ranks_matches_one(tiny_ckpt, engine, reference):
    cases = CASES[:3]
    single = run(engine, [make_input(f"t1-{i}", c, reference) for i, c in enumerate(cases)])
    tp = LLMEngine(make_config(tiny_ckpt, parallel={"tensor_parallel_size": 2}))
    try:
        double = run(tp, [make_input(f"t2-{i}", c, reference) for i, c in enumerate(cases)])
    finally:
        tp.shutdown()
    for i, case in enumerate(cases):
        assert tokens_of(double[f"t2-{i}"]) == tokens_of(single[f"t1-{i}"]) == reference.generate(case)
