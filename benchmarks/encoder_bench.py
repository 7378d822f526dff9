"""Vision encoder benchmark on the ``small`` preset, peers measured in the same run.

(a) tiles/s for 8 concurrent one-tile requests through the batcher vs the same requests one at a time;
(b) the cache read path for a 13-tile image (``RedisEmbeddingStore.get``: manifest + pipelined tiles +
    CRC checks; and a whole ``EncoderCore`` hit) vs one raw redis-py GET of the same bytes, and vs a
    cold encode of the image;
(c) embeddings written to Redis per second (13-tile entries).

Usage: python benchmarks/encoder_bench.py [--redis redis://127.0.0.1:6379/7] [--out benchmarks/results/encoder.json]
Keys go to a namespace unique to the run and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.refs import KIND_CACHE
from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.common.types import TiledImage
from services.embedding_cache.config import LruConfig, RedisStoreConfig
from services.embedding_cache.redis_store import tile_key
from services.encoder.config import BatchingConfig, EncoderConfig
from services.encoder.core import EncoderCore


def tiled(n: int, seed: int) -> TiledImage:
    rng = np.random.default_rng(seed)
    return TiledImage(rng.integers(0, 256, (n, 448, 448, 3), dtype=np.uint8), (n, 1), 448 * n, 448)


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


async def bench_batching(core: EncoderCore, requests: int, repeats: int) -> dict:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    seq_rates, batch_rates = [], []
    seed = 1000
    for _ in range(repeats):
        imgs = [tiled(1, seed + i) for i in range(requests)]
        seed += requests
        t0 = time.perf_counter()
        for im in imgs:
            await core.embed_tiles([im], ns)
        seq_rates.append(requests / (time.perf_counter() - t0))
        imgs = [tiled(1, seed + i) for i in range(requests)]
        seed += requests
        t0 = time.perf_counter()
        await asyncio.gather(*(core.embed_tiles([im], ns) for im in imgs))
        batch_rates.append(requests / (time.perf_counter() - t0))
    return {
        "requests": requests,
        "tiles_per_request": 1,
        "one_at_a_time_tiles_per_s": max(seq_rates),
        "batched_tiles_per_s": max(batch_rates),
        "speedup": max(batch_rates) / max(seq_rates),
        "recent_batches": list(core.batcher.recent_batches)[-requests:],
    }


async def bench_read_path(core: EncoderCore, raw: redis.asyncio.Redis, repeats: int) -> dict:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    image = tiled(13, 7)
    t0 = time.perf_counter()
    (ref,) = await core.embed_tiles([image], ns)
    cold = time.perf_counter() - t0
    if ref.kind != KIND_CACHE:
        raise RuntimeError("the benchmark needs a working Redis")
    store = core.shared
    blobs = [await raw.get(tile_key(ref.key, i)) for i in range(ref.tiles)]
    whole = b"".join(blobs)
    raw_key = f"{ref.key}:rawbench"
    await raw.set(raw_key, whole, ex=600)
    raw_t, get_t, hit_t = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = await raw.get(raw_key)
        raw_t.append(time.perf_counter() - t0)
        assert got is not None and len(got) == len(whole)
        t0 = time.perf_counter()
        entry = await store.get(ref.key)
        get_t.append(time.perf_counter() - t0)
        assert entry is not None
        t0 = time.perf_counter()
        (hit,) = await core.embed_tiles([image], ns)
        hit_t.append(time.perf_counter() - t0)
        assert hit.cache_hit
    await raw.delete(raw_key)
    return {
        "tiles": ref.tiles,
        "bytes": len(whole),
        "raw_get_p50_ms": p50(raw_t) * 1e3,
        "store_get_p50_ms": p50(get_t) * 1e3,
        "store_get_over_raw_get": p50(get_t) / p50(raw_t),
        "core_hit_p50_ms": p50(hit_t) * 1e3,
        "core_hit_over_raw_get": p50(hit_t) / p50(raw_t),
        "cold_encode_ms": cold * 1e3,
        "cold_over_store_get": cold / p50(get_t),
    }


async def bench_writes(core: EncoderCore, seconds: float) -> dict:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    (ref,) = await core.embed_tiles([tiled(13, 9)], ns)
    entry = await core.shared.get(ref.key)
    n, t0 = 0, time.perf_counter()
    keys = []
    while time.perf_counter() - t0 < seconds:
        key = f"{ref.key}:w{n}"
        await core.shared.put(key, entry, ttl_s=120)
        keys.append(key)
        n += 1
    elapsed = time.perf_counter() - t0
    for k in keys:
        await core.shared.delete(k)
    return {
        "entry_tiles": len(entry.tiles),
        "entry_bytes": entry.nbytes,
        "images_per_s": n / elapsed,
        "tile_embeddings_per_s": n * len(entry.tiles) / elapsed,
        "mb_per_s": n * entry.nbytes / elapsed / 1e6,
    }


async def main(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "small", preset="small", seed=0)
        redis_cfg = RedisStoreConfig(url=args.redis, op_timeout_s=5.0)
        config = EncoderConfig(
            checkpoint=str(ckpt),
            fallback="inline",
            batching=BatchingConfig(max_batch_tiles=32, max_wait_ms=2.0),
            redis=redis_cfg,
            lru=LruConfig(enabled=False),
        )
        core = EncoderCore.from_config(config, registry=CollectorRegistry())
        raw = redis.asyncio.Redis.from_url(args.redis)
        try:
            await core.embed_tiles([tiled(2, 0)], f"bench-warm-{uuid.uuid4().hex[:6]}")  # warm up
            batching = await bench_batching(core, args.requests, args.repeats)
            read = await bench_read_path(core, raw, args.reads)
            writes = await bench_writes(core, args.write_seconds)
        finally:
            for pattern in ("ivm:emb:v1:bench-*",):
                async for key in raw.scan_iter(match=pattern, count=1000):
                    await raw.delete(key)
            await raw.aclose()
            await core.close()
    return {
        "preset": "small",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "batching": batching,
        "read_path": read,
        "writes": writes,
        "targets": {"batching_speedup_min": 1.5, "store_get_over_raw_get_max": 1.5},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--out", default="benchmarks/results/encoder.json")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reads", type=int, default=15)
    parser.add_argument("--write-seconds", type=float, default=3.0)
    result = asyncio.run(main(parser.parse_args()))
    out = Path(parser.parse_args().out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
