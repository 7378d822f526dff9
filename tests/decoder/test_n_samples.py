"""``n`` > 1 through the decoder's entry point (``DecoderFrontend`` over a real ``DecoderCore`` of the
tiny checkpoint): greedy choices equal the transformers reference, seeded choices are reproducible and
distinct, the prompt is prefilled once (the scheduler's and block manager's own counters say so), and
closing the merged stream frees every sample's KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from services.common.errors import InvalidArgument
from services.decoder.engine.async_engine import DecoderCore
from services.decoder.samples import sample_inputs, sample_seed
from services.decoder.server import DecoderFrontend
from services.decoder.types import (
    ChatMessage,
    DecodeRequest,
    FinishReason,
    ImagePlaceholder,
    SamplingParams,
    TextContent,
)
from services.embedding_cache.resolver import EmbeddingResolver
from tests.decoder.helpers import Case, make_config, make_input, run, user
from tests.decoder.test_decode_hop import inline_ref
from tests.support.signing import SIGNER, signed

NUM_BLOCKS = 128
BLOCK_SIZE = 16  # make_config's


@pytest.fixture(scope="module")
def frontend(tiny_ckpt):
    core = DecoderCore(make_config(tiny_ckpt, cache={"num_blocks": NUM_BLOCKS}, engine_process=False))
    yield DecoderFrontend(core, EmbeddingResolver(None), SIGNER)
    core.shutdown()


def by_choice(events) -> dict[int, list]:
    out: dict[int, list] = {}
    for e in events:
        out.setdefault(e.index, []).append(e)
    return out


def tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


async def collect(frontend, request, refs, name: str):
    ctx = signed(request_id=name, tenant=name, cache_namespace=name)
    return [e async for e in frontend.generate(request, refs, ctx)]


async def wait_idle(core, timeout=10.0):
    end = time.monotonic() + timeout
    while core.stats()["running"] or core.stats()["waiting"]:
        if time.monotonic() > end:
            raise TimeoutError(core.stats())
        await asyncio.sleep(0.01)


async def test_greedy_choices_equal_the_reference_and_the_prompt_is_prefilled_once(frontend, reference):
    case = Case(user(None, "Describe the picture in detail."), [3], 12)
    request = DecodeRequest(
        [ChatMessage("user", [ImagePlaceholder(), TextContent("Describe the picture in detail.")])],
        SamplingParams(temperature=0.0),
        case.max_tokens,
        n=4,
    )
    engine = frontend.core.engine
    hits_before = engine.block_manager.prefix_hits
    events = await collect(frontend, request, [inline_ref(reference, 3)], "n-greedy")

    choices = by_choice(events)
    assert sorted(choices) == [0, 1, 2, 3]
    want = reference.generate(case)
    prompt = len(reference.prompt_ids(case))
    shareable = (prompt - 1) // BLOCK_SIZE * BLOCK_SIZE
    for k, evs in choices.items():
        assert tokens(evs) == want, k
        assert [e.finished for e in evs].count(True) == 1 and evs[-1].finished
        assert {e.request_id for e in evs} == {"n-greedy"}
        assert (evs[-1].usage.prompt_tokens, evs[-1].usage.image_tokens) == (prompt, 256)
    cached = sorted(evs[-1].usage.cached_prompt_tokens for evs in choices.values())
    assert cached == [0, shareable, shareable, shareable]  # one prefill, three cache hits
    assert engine.block_manager.prefix_hits - hits_before == 3 * shareable
    # tokens computed for this tenant: the prompt once, three partial last blocks, the decode steps
    decode = sum(evs[-1].usage.completion_tokens - 1 for evs in choices.values())
    assert engine.scheduler.policy.tokens["n-greedy"] == prompt + 3 * (prompt - shareable) + decode


def test_samples_added_together_prefill_the_prompt_once(engine, reference):
    """Four samples in the queue before the first step: the scheduler prefills one, the others wait for
    its blocks and compute only the prompt's last partial block."""
    case = Case(user(None, "What is in this picture?"), [4], 6, namespace="n-engine")
    inp = make_input("n-engine", case, reference, SamplingParams(temperature=0.0), tenant="n-engine")
    hits_before = engine.block_manager.prefix_hits
    events = run(engine, sample_inputs(inp, 4))
    prompt = len(reference.prompt_ids(case))
    shareable = (prompt - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert sorted(events) == [f"n-engine-{k}" for k in range(4)]
    assert all(tokens(evs) == reference.generate(case) for evs in events.values())
    assert sorted(evs[-1].usage.cached_prompt_tokens for evs in events.values()) == [0, *[shareable] * 3]
    assert engine.block_manager.prefix_hits - hits_before == 3 * shareable
    decode = sum(evs[-1].usage.completion_tokens - 1 for evs in events.values())
    assert engine.scheduler.policy.tokens["n-engine"] == prompt + 3 * (prompt - shareable) + decode
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def test_seeded_choices_are_reproducible_distinct_and_seeded_s_plus_k(frontend):
    sampling = SamplingParams(temperature=1.0, seed=11, ignore_eos=True)
    request = DecodeRequest([ChatMessage("user", [TextContent("Tell me a story.")])], sampling, 8, n=4)
    first = by_choice(await collect(frontend, request, [], "n-seeded-a"))
    again = by_choice(await collect(frontend, request, [], "n-seeded-b"))
    outputs = {k: tokens(evs) for k, evs in first.items()}
    assert outputs == {k: tokens(evs) for k, evs in again.items()}
    assert len({tuple(t) for t in outputs.values()}) == 4
    for k in (0, 3):  # choice k is what n = 1 gives with seed s + k
        single = DecodeRequest(
            request.messages, SamplingParams(temperature=1.0, seed=sample_seed(11, k), ignore_eos=True), 8
        )
        alone = await collect(frontend, single, [], f"n-seeded-single-{k}")
        assert tokens(alone) == outputs[k]
        assert {e.index for e in alone} == {0}


async def test_closing_the_merged_stream_cancels_every_sample(frontend):
    core = frontend.core
    long = SamplingParams(temperature=1.0, ignore_eos=True)
    request = DecodeRequest([ChatMessage("user", [TextContent("Talk for a long time.")])], long, 900, n=4)
    stream = frontend.generate(request, [], signed(request_id="n-cancel", tenant="t", cache_namespace="t"))
    seen = set()
    async with contextlib.aclosing(stream):
        async for event in stream:
            seen.add(event.index)
            if len(seen) == 4:
                break
    await wait_idle(core)
    assert not [r for r in core.engine.scheduler.requests if r.startswith("n-cancel")]
    assert core.engine.block_manager.num_free_blocks == NUM_BLOCKS
    assert core.engine.scheduler.siblings.groups == {}


@pytest.mark.parametrize("n", [0, -1, 17])
async def test_n_outside_the_mesh_bound_is_refused(frontend, n):
    request = DecodeRequest([ChatMessage("user", [TextContent("Hi")])], SamplingParams(), 4, n=n)
    with pytest.raises(InvalidArgument) as err:
        await collect(frontend, request, [], "n-bound")
    assert err.value.reason == "n_out_of_range"


async def test_an_invalid_sample_fails_the_merged_stream_before_it_starts(frontend):
    request = DecodeRequest([ChatMessage("user", [TextContent("Hi")])], SamplingParams(), 10**6, n=3)
    with pytest.raises(InvalidArgument) as err:
        await collect(frontend, request, [], "n-invalid")
    assert err.value.reason == "context_length_exceeded"
    await wait_idle(frontend.core)
    assert not frontend.core.engine.scheduler.requests


async def test_finish_reasons_are_per_choice(frontend):
    """Each choice ends with its own last event: its finish reason and its own completion count."""
    sampling = SamplingParams(temperature=1.0, seed=5, ignore_eos=True)
    request = DecodeRequest([ChatMessage("user", [TextContent("Count.")])], sampling, 6, n=3)
    events = await collect(frontend, request, [], "n-finish")
    for evs in by_choice(events).values():
        assert evs[-1].finish_reason is FinishReason.LENGTH and evs[-1].usage.completion_tokens == 6
