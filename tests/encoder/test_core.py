"""EncoderCore end to end on the real Redis (the suite's db) with the real tiny checkpoint and the
real preprocess."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from services.common.refs import KIND_CACHE, KIND_INLINE
from services.common.types import TiledImage, TilingParams
from services.embedding_cache.config import LruConfig, RedisStoreConfig
from services.embedding_cache.redis_store import tile_key
from services.encoder.config import BatchingConfig, EncoderConfig
from services.encoder.core import EncoderCore, ImageInput, PreprocessorTileSource
from services.preprocess.pipeline import Preprocessor
from tests.encoder.helpers import REDIS_URL, RUN_NS, namespace
from tests.support.images import png
from tests.support.own_redis import OwnRedis


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of per-pixel noise (every tile different), quickly compressed."""
    return png(width, height, seed, block=1, high=256, compress_level=1)


SQUARE = png_bytes(448, 448, seed=1)  # 1 tile
WIDE = png_bytes(896, 448, seed=2)  # 2x1 grid + thumbnail = 3 tiles


@pytest.fixture(scope="module")
def preprocessor():
    with Preprocessor() as p:
        yield p


@pytest.fixture
async def make_core(tiny_checkpoint, vision_encoder, preprocessor):
    cores = []

    def make(redis_url: str | None = REDIS_URL, lru: bool = False, **redis_overrides) -> EncoderCore:
        config = EncoderConfig(
            checkpoint=str(tiny_checkpoint),
            fallback="inline",
            batching=BatchingConfig(max_batch_tiles=16, max_wait_ms=5),
            redis=None if redis_url is None else RedisStoreConfig(url=redis_url, **redis_overrides),
            lru=LruConfig(enabled=lru),
        )
        core = EncoderCore.from_config(
            config,
            tile_source=PreprocessorTileSource(preprocessor),
            registry=CollectorRegistry(),
            encoder=vision_encoder,
        )
        cores.append(core)
        return core

    yield make
    for core in cores:
        await core.close()


def read_back(sync_redis: redis.Redis, key: str) -> torch.Tensor:
    manifest = json.loads(sync_redis.get(key))
    blobs = [sync_redis.get(tile_key(key, i)) for i in range(manifest["tiles"])]
    rows, dim = manifest["tile_shape"]
    data = b"".join(blobs)
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(manifest["tiles"] * rows, dim)


async def test_miss_then_hit_across_replicas(make_core, sync_redis, vision_encoder, preprocessor):
    ns = namespace("hit")
    first = make_core()
    (miss,) = await first.embed_images([ImageInput(WIDE)], ns)
    assert miss.kind == KIND_CACHE and not miss.cache_hit
    assert (miss.tiles, miss.tokens_per_tile, miss.dim, miss.dtype, miss.grid) == (
        3,
        256,
        64,
        "float32",
        (2, 1),
    )
    assert first.stats.encodes == 1 and first.stats.misses == 1
    # The cached rows are exactly the encoder's output for the preprocess tiles.
    (tiled,) = preprocessor.tile_images([(WIDE, TilingParams())])
    expected = vision_encoder.encode(torch.from_numpy(tiled.tiles)).reshape(-1, 64)
    assert (read_back(sync_redis, miss.key) - expected).abs().max().item() <= 1e-5

    (hit,) = await first.embed_images([ImageInput(WIDE)], ns)
    assert hit.kind == KIND_CACHE and hit.cache_hit and hit.key == miss.key
    assert first.stats.encodes == 1 and first.stats.hits_shared == 1

    other = make_core()  # another replica: shares through Redis
    (hit2,) = await other.embed_images([ImageInput(WIDE)], ns)
    assert hit2.cache_hit and other.stats.encodes == 0


async def test_keys_live_under_the_configured_prefix(make_core, sync_redis):
    core = make_core(key_prefix=RUN_NS)
    (ref,) = await core.embed_images([ImageInput(SQUARE)], namespace("prefix"))
    assert ref.kind == KIND_CACHE and ref.key.startswith(f"{RUN_NS}:emb:v1:")
    assert sync_redis.exists(ref.key, tile_key(ref.key, 0)) == 2


async def test_lru_answers_without_redis_traffic(make_core):
    ns = namespace("lru")
    core = make_core(lru=True)
    await core.embed_images([ImageInput(SQUARE)], ns)
    (again,) = await core.embed_images([ImageInput(SQUARE)], ns)
    assert again.cache_hit and again.kind == KIND_CACHE and core.stats.hits_lru == 1


async def test_ttl_expiry(make_core):
    ns = namespace("ttl")
    core = make_core(ttl_s=1.0)
    await core.embed_images([ImageInput(SQUARE)], ns)
    await asyncio.sleep(1.3)
    (again,) = await core.embed_images([ImageInput(SQUARE)], ns)
    assert not again.cache_hit and core.stats.encodes == 2


async def test_inline_answers_tensors_even_for_cache_hits(make_core, sync_redis):
    """The gateway's second attempt (the decoder could not read the first references) asks for the
    tensors: a cache hit, an LRU hit and a request that joins another's encode all come back inline,
    equal to what the cache holds, while a plain request still gets a cache reference."""
    ns = namespace("inline")
    core = make_core(lru=True)
    (first,) = await core.embed_images([ImageInput(WIDE)], ns)
    assert first.kind == KIND_CACHE
    (again,) = await core.embed_images([ImageInput(WIDE)], ns, inline=True)
    assert again.kind == KIND_INLINE and again.cache_hit and again.key == first.key
    assert torch.equal(again.tensor.to_torch(), read_back(sync_redis, first.key))

    other = make_core()  # no LRU: the entry comes from Redis
    (shared,) = await other.embed_images([ImageInput(WIDE)], ns, inline=True)
    assert shared.kind == KIND_INLINE and other.stats.hits_shared == 1 and other.stats.encodes == 0
    assert torch.equal(shared.tensor.to_torch(), again.tensor.to_torch())

    plain, inline = await asyncio.gather(
        core.embed_images([ImageInput(SQUARE)], ns), core.embed_images([ImageInput(SQUARE)], ns, inline=True)
    )
    assert core.stats.joined == 1
    assert plain[0].kind == KIND_CACHE and inline[0].kind == KIND_INLINE
    assert torch.equal(inline[0].tensor.to_torch(), read_back(sync_redis, plain[0].key))


async def test_namespace_isolation(make_core):
    core = make_core()
    (a,) = await core.embed_images([ImageInput(SQUARE)], namespace("tenantA"))
    (b,) = await core.embed_images([ImageInput(SQUARE)], namespace("tenantB"))
    assert a.key != b.key and not b.cache_hit and core.stats.encodes == 2


async def test_single_flight_in_process(make_core):
    core = make_core()
    ns = namespace("sf")
    refs = await asyncio.gather(*(core.embed_images([ImageInput(WIDE)], ns) for _ in range(8)))
    assert core.stats.encodes == 1 and core.stats.joined == 7
    assert len({r[0].key for r in refs}) == 1


async def test_single_flight_across_replicas(make_core):
    ns = namespace("sfx")
    a, b = make_core(lock_poll_s=0.005), make_core(lock_poll_s=0.005)
    await asyncio.gather(a.embed_images([ImageInput(WIDE)], ns), b.embed_images([ImageInput(WIDE)], ns))
    assert a.stats.encodes + b.stats.encodes == 1
    assert a.stats.filled_by_replica + b.stats.filled_by_replica == 1


async def test_corrupt_entry_is_a_miss(make_core, sync_redis):
    ns = namespace("corrupt")
    (ref,) = await make_core().embed_images([ImageInput(WIDE)], ns)
    last = tile_key(ref.key, ref.tiles - 1)
    blob = sync_redis.get(last)
    sync_redis.set(last, bytes([blob[0] ^ 0x01]) + blob[1:], keepttl=True)
    core = make_core()
    (again,) = await core.embed_images([ImageInput(WIDE)], ns)
    assert not again.cache_hit and core.stats.encodes == 1
    assert sync_redis.get(last) != bytes([blob[0] ^ 0x01]) + blob[1:]  # rewritten intact


async def test_embed_tiles_batched_match_transformers(make_core, tiny_checkpoint):
    """1, 2 and 13-tile images sent as tiles, concurrently (one shared forward), against transformers."""
    from transformers import InternVLModel

    from services.preprocess.normalize import normalize_tiles

    core = make_core(redis_url=None)
    gen = torch.Generator().manual_seed(4)
    images = [
        TiledImage(
            torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8, generator=gen).numpy(),
            (n, 1),
            448,
            448,
        )
        for n in (1, 2, 13)
    ]
    refs = await asyncio.gather(*(core.embed_tiles([im], namespace("tiles")) for im in images))
    assert max(r for _, r in core.batcher.recent_batches) > 1  # they did share a forward
    reference = InternVLModel.from_pretrained(tiny_checkpoint).eval()
    for image, (ref,) in zip(images, refs):
        assert ref.kind == KIND_INLINE
        ours = ref.tensor.to_torch()
        with torch.no_grad():
            theirs = reference.get_image_features(
                normalize_tiles(torch.from_numpy(image.tiles))
            ).pooler_output
        assert (ours - theirs.reshape(-1, theirs.shape[-1])).abs().max().item() <= 1e-5


async def test_redis_killed_mid_test_then_back(make_core, own_redis: OwnRedis):
    ns = namespace("kill")
    core = make_core(redis_url=own_redis.url, op_timeout_s=0.3, reprobe_interval_s=0.2, failure_threshold=1)
    (before,) = await core.embed_images([ImageInput(SQUARE)], ns)
    assert before.kind == KIND_CACHE

    own_redis.kill()
    images = [ImageInput(png_bytes(448, 448, seed=100 + i)) for i in range(3)] + [ImageInput(SQUARE)]
    refs = await core.embed_images(images, ns)
    assert all(r.kind == KIND_INLINE and r.tensor is not None for r in refs)
    assert refs[-1].tensor.to_torch().shape == (256, 64)
    assert core.stats.degraded == 4 and not core.shared.available
    degraded = core.metrics.degraded.labels(core.label, "cache_unavailable")._value.get()
    assert degraded == 4

    own_redis.start()  # same port
    await asyncio.sleep(0.3)  # past the re-probe interval
    (after,) = await core.embed_images([ImageInput(png_bytes(448, 448, seed=200))], ns)
    assert after.kind == KIND_CACHE
    assert redis.Redis(port=own_redis.port).exists(after.key) == 1
    assert core.shared.available


async def test_redis_full_is_not_a_failure(make_core, own_redis: OwnRedis):
    client = redis.Redis(port=own_redis.port)
    client.set("filler", b"x" * (2 << 20))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(1 << 20))  # below what is stored: every write is refused (OOM)
    core = make_core(redis_url=own_redis.url)
    (ref,) = await core.embed_images([ImageInput(SQUARE)], namespace("oom"))
    assert ref.kind == KIND_INLINE
    assert core.metrics.degraded.labels(core.label, "cache_full")._value.get() == 1
    client.close()


async def test_the_mesh_bounds_hold_whoever_asks(make_core):
    """Images and tiles per request are bounded by the encoder itself, tiles counted from the headers
    before anything is tiled or encoded: 17 images, or 4 images of 41 tiles (164 > 128)."""
    from services.common.errors import InvalidArgument
    from services.common.types import TilingParams

    core = make_core(redis_url=None)
    wide = ImageInput(png_bytes(800, 500), TilingParams(max_num=40))  # aspect 1.6: 8x5 grid + thumbnail
    for images, reason in (([ImageInput(SQUARE)] * 17, "too_many_images"), ([wide] * 4, "too_many_tiles")):
        with pytest.raises(InvalidArgument) as err:
            await core.embed_images(images, namespace("bounds"))
        assert err.value.reason == reason
    assert core.stats.encodes == 0
