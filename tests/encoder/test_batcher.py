"""The tile batcher: packing, fairness, priority, deadlines and bounds, with the real tiny encoder."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.encoder.batcher import TileBatcher, _Request, plan_batch
from services.encoder.config import BatchingConfig
from services.encoder.metrics import encoder_metrics


def tiles(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8, generator=g)


def req(seq: int, n: int, priority: int = 0) -> _Request:
    return _Request(seq, priority, torch.empty(n, 1, 1, 3, dtype=torch.uint8), None, 0.0, None)  # type: ignore[arg-type]


def test_plan_water_fills_smallest_first():
    big, small1, small2 = req(0, 40), req(1, 1), req(2, 3)
    plan = plan_batch([big, small1, small2], budget=16)
    taken = {s.request.seq: s.stop - s.start for s in plan}
    assert taken == {1: 1, 2: 3, 0: 12}


def test_plan_serves_higher_priority_first():
    low, high = req(0, 10, priority=0), req(1, 10, priority=5)
    plan = plan_batch([low, high], budget=12)
    taken = {s.request.seq: s.stop - s.start for s in plan}
    assert taken == {1: 10, 0: 2}


def test_plan_with_more_requests_than_budget_takes_oldest():
    reqs = [req(i, 1) for i in range(10)]
    plan = plan_batch(reqs, budget=4)
    assert [s.request.seq for s in plan] == [0, 1, 2, 3]


@pytest.fixture
def make_batcher(vision_encoder):
    def make(**cfg):
        b = TileBatcher(
            vision_encoder.encode,
            BatchingConfig(**cfg),
            metrics=encoder_metrics(CollectorRegistry()),
            model_label="tiny",
        )
        return b

    return make


async def test_concurrent_requests_share_forwards_and_match_alone(make_batcher, vision_encoder):
    b = make_batcher(max_batch_tiles=16, max_wait_ms=50)
    inputs = [tiles(n, seed=n) for n in (1, 2, 3, 13)]
    outs = await asyncio.gather(*(b.submit(t) for t in inputs))
    for t, out in zip(inputs, outs):
        assert out.shape == (t.shape[0], 256, vision_encoder.dim)
        assert (out - vision_encoder.encode(t)).abs().max().item() <= 1e-5
    assert b.forwards < 4 and max(r for _, r in b.recent_batches) > 1
    await b.close()


async def test_large_image_does_not_starve_small_one(make_batcher):
    b = make_batcher(max_batch_tiles=8, max_wait_ms=20)
    done = []

    async def run(name, n):
        await b.submit(tiles(n))
        done.append(name)

    big = asyncio.create_task(run("big", 40))
    await asyncio.sleep(0.01)
    small = asyncio.create_task(run("small", 1))
    await asyncio.gather(big, small)
    assert done == ["small", "big"]
    await b.close()


async def test_higher_priority_goes_first(make_batcher):
    b = make_batcher(max_batch_tiles=4, max_wait_ms=100)
    done = []

    async def run(name, prio):
        await b.submit(tiles(4), priority=prio)
        done.append(name)

    await asyncio.gather(run("low", 0), run("high", 9))
    assert done == ["high", "low"]
    await b.close()


async def test_deadline_and_queue_bound(make_batcher):
    b = make_batcher(max_batch_tiles=4, max_queued_tiles=8)
    with pytest.raises(DeadlineExceeded):
        await b.submit(tiles(1), deadline=time.monotonic() - 1)
    first = asyncio.create_task(b.submit(tiles(8)))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):
        await b.submit(tiles(4))
    await first
    await b.close()


async def test_batch_sizes_are_in_the_histogram(vision_encoder):
    registry = CollectorRegistry()
    b = TileBatcher(
        vision_encoder.encode,
        BatchingConfig(max_batch_tiles=8),
        metrics=encoder_metrics(registry),
        model_label="m",
    )
    await asyncio.gather(b.submit(tiles(2)), b.submit(tiles(3)))
    await b.close()
    count = registry.get_sample_value("internvl_mesh_encoder_batch_tiles_count", {"model": "m"})
    total = registry.get_sample_value("internvl_mesh_encoder_batch_tiles_sum", {"model": "m"})
    assert count >= 1 and total == 5


@pytest.mark.parametrize("fair", [True, False])
async def test_tenants_share_forwards_by_weight(vision_encoder, fair):
    registry = CollectorRegistry()
    b = TileBatcher(
        vision_encoder.encode,
        BatchingConfig(max_batch_tiles=4, max_wait_ms=200, fair_share=fair),
        metrics=encoder_metrics(registry),
        model_label="tiny",
    )
    done_at = {}

    async def run(name, tenant, seed):
        await b.submit(tiles(4, seed), tenant=tenant, weight=1.0)
        done_at[name] = b.forwards

    await asyncio.gather(*(run(f"a{i}", "A", i) for i in range(3)), run("b", "B", 9))
    # fair: B gets half of each forward and is done after two; off: every image a quarter, all after four
    assert done_at["b"] == (2 if fair else 4)
    assert (
        registry.get_sample_value(
            "internvl_mesh_encoder_tenant_tiles_total", {"model": "tiny", "tenant": "B"}
        )
        == 4
    )
    assert (
        registry.get_sample_value(
            "internvl_mesh_encoder_tenant_queue_seconds_count", {"model": "tiny", "tenant": "A"}
        )
        == 3
    )
    await b.close()
