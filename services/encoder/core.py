"""The vision encoder's domain core: images (or tiles) in, embedding references out.

For each image, in order:

1. its content address (namespace, encoder identity, tiling parameters, SHA-256 of the bytes);
2. the in-process LRU, then Redis: a hit costs no preprocess and no ViT;
3. single-flight: concurrent requests for the same address in this process share one encode, and across
   replicas a short Redis fill lock (``SET NX PX``) makes the others wait for the filler's entry
   (bounded by the lock's TTL, after which they encode themselves);
4. on a miss: tiles from the ``TileSource`` (in-process, Ray handle or gRPC: the core does not care),
   one shared forward through the ``TileBatcher``, the entry written to Redis and the LRU.

The answer is a reference (``services.common.refs.EmbeddingRef``): ``cache`` when Redis holds the
entry; otherwise (no Redis configured, Redis down, slow or full) the embedding travels with the
answer as a Ray object reference (inside Ray) or inline. A Redis failure never fails a request: it is
counted, logged by the store's circuit breaker, and caching resumes on its own when Redis returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from services.common import tracing
from services.common.checkpoint import Checkpoint
from services.common.context import RequestContext
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.limits import check_image_tiles
from services.common.refs import (
    DEFAULT_KEY_PREFIX,
    KIND_CACHE,
    KIND_INLINE,
    KIND_OBJECT,
    EmbeddingRef,
    embedding_key,
    encoder_identity,
    validate_namespace,
)
from services.common.tensors import WireTensor, torch_dtype_name
from services.common.types import TiledImage, TilingParams, VideoClip, sha256_hex
from services.embedding_cache.errors import StoreFull, StoreUnavailable
from services.embedding_cache.memory import MemoryEmbeddingStore
from services.embedding_cache.redis_store import RedisEmbeddingStore
from services.embedding_cache.store import StoredEmbedding
from services.embedding_cache.tiered import LEVEL_LRU, TieredEmbeddingStore
from services.encoder.batcher import TileBatcher
from services.encoder.config import EncoderConfig
from services.encoder.metrics import EncoderMetrics, encoder_metrics
from services.encoder.vision_model import VisionEncoder

log = logging.getLogger(__name__)


class TileSource(Protocol):
    """Where tiles come from for images that must be encoded: in-process, a Ray handle or gRPC.
    ``ctx`` is the verified context of the request the tiles are for, passed on to the preprocess
    service (which verifies it again)."""

    async def tile(
        self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext | None = None
    ) -> list[TiledImage]: ...

    async def tile_video(self, clip: VideoClip, ctx: RequestContext | None = None) -> TiledImage:
        """A video's sampled frames decoded and tiled: one ``TiledImage``, its tiles frame by frame."""


class PreprocessorTileSource:
    """A ``TileSource`` over an in-process ``services.preprocess.pipeline.Preprocessor``."""

    def __init__(self, preprocessor: Any):
        self.preprocessor = preprocessor

    async def tile(
        self, items: Sequence[tuple[bytes, TilingParams]], ctx: RequestContext | None = None
    ) -> list[TiledImage]:
        return await self.preprocessor.atile_images(items)

    async def tile_video(self, clip: VideoClip, ctx: RequestContext | None = None) -> TiledImage:
        return await self.preprocessor.atile_video(clip)


@dataclass(frozen=True)
class ImageInput:
    """One image as the gateway sends it: encoded bytes and how to tile them."""

    data: bytes
    tiling: TilingParams = field(default_factory=TilingParams)


@dataclass
class EncoderStats:
    """Plain counters (the Prometheus metrics carry the same facts with labels)."""

    images: int = 0
    hits_lru: int = 0
    hits_shared: int = 0
    misses: int = 0
    encodes: int = 0  # images run through the ViT
    tiles_encoded: int = 0
    joined: int = 0  # requests that shared another request's encode in this process
    waited_on_replica: int = 0  # misses that waited on another replica's fill lock
    filled_by_replica: int = 0  # ... and got its entry
    degraded: int = 0  # answers made without the shared cache because it failed
    shared_writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Job:
    """What resolving one image needs; ``get_tiles`` is only called on a miss."""

    key: str
    sha256: str
    get_tiles: Callable[[], Awaitable[TiledImage]]
    priority: int
    deadline: float | None
    tenant: str = ""  # whose fair share of the tiles pays for an encode (the first asker's)
    weight: float = 1.0
    frames: int = 1  # a video's sampled frames (an image is one)


class EncoderCore:
    """Embeds images and tiles; returns references. Build with :meth:`from_config`.

    One instance per encoder replica; safe for any number of concurrent calls on its event loop.
    """

    def __init__(
        self,
        config: EncoderConfig,
        encoder: VisionEncoder,
        *,
        identity: str,
        shared: RedisEmbeddingStore | None = None,
        tile_source: TileSource | None = None,
        metrics: EncoderMetrics | None = None,
        model_label: str = "",
    ):
        self.config = config
        self.encoder = encoder
        self.identity = identity
        self.tile_source = tile_source
        self.metrics = metrics if metrics is not None else encoder_metrics()
        self.label = model_label or "default"
        self.shared = shared
        self.key_prefix = config.redis.key_prefix if config.redis is not None else DEFAULT_KEY_PREFIX
        front = (
            MemoryEmbeddingStore(config.lru.max_bytes, config.lru.ttl_s, config.lru.max_bytes)
            if config.lru.enabled
            else None
        )
        self.store = (
            TieredEmbeddingStore(front, shared, config.redis.ttl_s if config.redis else None)
            if front is not None or shared is not None
            else None
        )
        self.batcher = TileBatcher(
            self._forward, config.batching, metrics=self.metrics, model_label=self.label
        )
        self.stats = EncoderStats()
        self._inflight: dict[str, asyncio.Task[EmbeddingRef]] = {}

    @classmethod
    def from_config(
        cls,
        config: EncoderConfig,
        *,
        tile_source: TileSource | None = None,
        registry: CollectorRegistry | None = None,
        encoder: VisionEncoder | None = None,
    ) -> EncoderCore:
        """Load the checkpoint's vision side and connect the store (lazily: Redis may be down now)."""
        ckpt = Checkpoint.open(config.checkpoint)
        if encoder is None:
            encoder = VisionEncoder.load(
                ckpt, config.device, config.dtype, config.attention, staged_io=config.staged_io
            )
        identity = encoder_identity(
            f"{ckpt.identity()}+vision-{encoder.spec.digest()}",
            torch_dtype_name(encoder.dtype),
            config.revision,
        )
        metrics = encoder_metrics(registry)
        label = ckpt.path.name
        shared = None
        if config.redis is not None:
            shared = RedisEmbeddingStore(config.redis, observer=_store_observer(metrics, label))
        return cls(
            config,
            encoder,
            identity=identity,
            shared=shared,
            tile_source=tile_source,
            metrics=metrics,
            model_label=label,
        )

    async def close(self) -> None:
        await self.batcher.close()
        if self.store is not None:
            await self.store.close()

    # -- public API ---------------------------------------------------------------------------------
    async def embed_images(
        self,
        images: Sequence[ImageInput | VideoClip],
        namespace: str,
        priority: int = 0,
        deadline: float | None = None,
        inline: bool = False,
        ctx: RequestContext | None = None,
        tenant: str = "",
        weight: float = 1.0,
    ) -> list[EmbeddingRef]:
        """Embed images given as encoded bytes; tiles are fetched from the tile source for misses only.

        ``deadline`` is a ``time.monotonic()`` instant (the servicer converts the RPC's deadline).
        ``tenant`` and ``weight`` (from the verified context) place the tiles in the batcher's fair share.
        ``inline`` answers with the tensors themselves, whatever the cache holds: the gateway asks for
        that when the decoder could not read a first set of references (a cache entry gone, or a cache
        the decoder cannot reach while this replica can). ``ctx``: the verified context, passed on to
        the tile source. The mesh's bounds of images and tiles per request (tiles counted from the
        headers, before any work) hold whoever asks.
        """
        validate_namespace(namespace)
        check_image_tiles([_header_tiles(i) for i in images], [_frames(i) for i in images])
        if self.tile_source is None:
            raise InvalidArgument(
                "this encoder has no tile source: send tiles (embed_tiles) instead of bytes"
            )
        jobs = []
        for image in images:
            if not image.data:
                raise InvalidArgument("an image has no bytes")
            tiling = image.tiling.validate()
            video = isinstance(image, VideoClip)
            # A video's address: its bytes' hash and the sampled frame numbers (the tiling joins in the key).
            sha = image.content_sha256() if video else sha256_hex(image.data)
            jobs.append(
                _Job(
                    embedding_key(namespace, self.identity, tiling, sha, self.key_prefix),
                    sha,
                    self._video_tiler(image, ctx) if video else self._tiler(image.data, tiling, ctx),
                    priority,
                    deadline,
                    tenant,
                    weight,
                    _frames(image),
                )
            )
        return await self._run_jobs(jobs, deadline, inline)

    async def embed_tiles(
        self,
        images: Sequence[TiledImage],
        namespace: str,
        tiling: TilingParams | Sequence[TilingParams] = TilingParams(),
        priority: int = 0,
        deadline: float | None = None,
        inline: bool = False,
        tenant: str = "",
        weight: float = 1.0,
    ) -> list[EmbeddingRef]:
        """Embed already-made uint8 tiles (N, S, S, 3) per image.

        An image's cache address uses the SHA-256 of its original bytes when ``TiledImage.sha256`` is set
        (then tiles and bytes share cache entries), else of its tile bytes. ``inline``: as in
        :meth:`embed_images`.
        """
        validate_namespace(namespace)
        check_image_tiles([int(getattr(image.tiles, "shape", (0,))[0]) for image in images])
        tilings = [tiling] * len(images) if isinstance(tiling, TilingParams) else list(tiling)
        if len(tilings) != len(images):
            raise InvalidArgument(f"{len(images)} images but {len(tilings)} tiling parameter sets")
        jobs = []
        for image, params in zip(images, tilings):
            self._check_tiled(image)
            sha = image.sha256 or _tiles_sha256(image.tiles)
            jobs.append(
                _Job(
                    embedding_key(namespace, self.identity, params.validate(), sha, self.key_prefix),
                    sha,
                    _ready(image),
                    priority,
                    deadline,
                    tenant,
                    weight,
                )
            )
        return await self._run_jobs(jobs, deadline, inline)

    # -- per image ----------------------------------------------------------------------------------
    async def _run_jobs(self, jobs: list[_Job], deadline: float | None, inline: bool) -> list[EmbeddingRef]:
        self.stats.images += len(jobs)
        coro = asyncio.gather(*(self._embed_one(job) for job in jobs))
        if deadline is None:
            results = await coro
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("deadline passed before the images were embedded")
            try:
                async with asyncio.timeout(left):
                    results = await coro
            except TimeoutError as exc:
                raise DeadlineExceeded("deadline passed while embedding images") from exc
        return [_inlined(ref, entry) if inline else ref for ref, entry in results]

    async def _embed_one(self, job: _Job) -> tuple[EmbeddingRef, StoredEmbedding]:
        """The image's reference and its entry (requests joining one encode share both; each makes
        its own kind of reference from them)."""
        task = self._inflight.get(job.key)
        if task is not None:
            self.stats.joined += 1
            self.metrics.images.labels(self.label, "joined").inc()
        else:
            task = asyncio.get_running_loop().create_task(self._resolve(job))
            self._inflight[job.key] = task
            task.add_done_callback(lambda t, key=job.key: self._settle(key, t))
        # shield: a caller that gives up does not cancel the encode others (and the cache) wait for.
        return await asyncio.shield(task)

    def _settle(self, key: str, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an encode nobody awaits any more is not reported as lost

    async def _resolve(self, job: _Job) -> tuple[EmbeddingRef, StoredEmbedding]:
        degraded: str | None = None
        if self.store is not None:
            with tracing.span(tracing.SPAN_CACHE_LOOKUP) as lookup_span:
                try:
                    found = await self.store.lookup(job.key)
                except StoreUnavailable as exc:
                    found, degraded = None, exc.reason
                lookup_span.set_attribute(tracing.ATTR_CACHE_HIT, found is not None)
            if found is not None:
                level = "lru" if found.level == LEVEL_LRU else "shared"
                self._count_hit(level)
                if not found.shared and self.shared is not None:
                    degraded = degraded or "cache_unavailable"
                return self._reference(
                    job, found.entry, shared=found.shared, hit=True, degraded=degraded
                ), found.entry
            self.metrics.cache_lookups.labels(self.label, "all", "miss").inc()
        self.stats.misses += 1

        token = None
        if self.shared is not None and degraded is None:
            try:
                token = await self.shared.acquire_fill_lock(job.key, self.config.redis.lock_ttl_s)  # type: ignore[union-attr]
                if token is None:
                    entry, token = await self._await_other_replica(job)
                    if entry is not None:
                        return self._reference(job, entry, shared=True, hit=True, degraded=None), entry
            except StoreUnavailable as exc:
                degraded = exc.reason
        try:
            entry = await self._encode(job)
            shared = False
            if self.store is not None:
                try:
                    shared = await self.store.put(job.key, entry) and self.shared is not None
                    self.stats.shared_writes += int(shared)
                except StoreFull as exc:
                    degraded = exc.reason
                except StoreUnavailable as exc:
                    degraded = exc.reason
            return self._reference(job, entry, shared=shared, hit=False, degraded=degraded), entry
        finally:
            if token is not None:
                try:
                    await self.shared.release_fill_lock(job.key, token)  # type: ignore[union-attr]
                except StoreUnavailable:
                    pass  # the lock expires on its own

    async def _await_other_replica(self, job: _Job) -> tuple[StoredEmbedding | None, str | None]:
        """Another replica holds the fill lock: poll for its entry, or for the lock to become ours."""
        cfg = self.config.redis
        shared = self.shared
        if cfg is None or shared is None:
            return None, None
        self.stats.waited_on_replica += 1
        until = time.monotonic() + cfg.lock_ttl_s
        if job.deadline is not None:
            until = min(until, job.deadline)
        while time.monotonic() < until:
            await asyncio.sleep(cfg.lock_poll_s)
            if await shared.contains(job.key):
                entry = await shared.get(job.key)
                if entry is not None:
                    self.stats.filled_by_replica += 1
                    if self.store is not None and self.store.front is not None:
                        await self.store.front.put(job.key, entry)
                    return entry, None
            token = await shared.acquire_fill_lock(job.key, cfg.lock_ttl_s)
            if token is not None:
                return None, token  # the other replica gave up or died: fill it ourselves
        return None, None  # waited as long as the lock lives: encode without it

    async def _encode(self, job: _Job) -> StoredEmbedding:
        tiled = await job.get_tiles()
        self._check_tiled(tiled, job.frames)
        tiles = torch.from_numpy(np.ascontiguousarray(tiled.tiles))  # (N, S, S, 3) uint8, no copy
        with tracing.span(tracing.SPAN_ENCODE, {tracing.ATTR_TILES: int(tiles.shape[0])}):
            out = await self.batcher.submit(
                tiles, job.priority, job.deadline, tenant=job.tenant, weight=job.weight
            )  # (N, T, D)
        n, t, d = out.shape
        self.stats.encodes += 1
        self.stats.tiles_encoded += n
        self.metrics.images.labels(self.label, "encoded").inc()
        wire = WireTensor.from_torch(out.reshape(n * t, d))  # (N, T, D) -> (N*T, D), tile-major rows
        return StoredEmbedding.from_tensor(wire, n, {"grid": list(tiled.grid), "frames": job.frames})

    # -- references ---------------------------------------------------------------------------------
    def _reference(
        self, job: _Job, entry: StoredEmbedding, *, shared: bool, hit: bool, degraded: str | None
    ) -> EmbeddingRef:
        grid = tuple(entry.meta.get("grid") or (1, 1))
        common = dict(
            key=job.key,
            image_sha256=job.sha256,
            tiles=len(entry.tiles),
            tokens_per_tile=entry.tokens_per_tile,
            dim=entry.dim,
            dtype=entry.dtype,
            grid=(int(grid[0]), int(grid[1])),
            cache_hit=hit,
            frames=int(entry.meta.get("frames") or 1),
        )
        if shared:
            return EmbeddingRef(kind=KIND_CACHE, **common)
        if degraded is not None:
            self.stats.degraded += 1
            self.metrics.degraded.labels(self.label, degraded).inc()
            log.debug("answering %s without the shared cache (%s)", job.key, degraded)
        tensor = entry.concat()  # (tiles * tokens_per_tile, dim)
        if self._fallback_kind() == KIND_OBJECT:
            import ray

            return EmbeddingRef(kind=KIND_OBJECT, object_ref=ray.put(tensor.to_numpy()), **common)
        return EmbeddingRef(kind=KIND_INLINE, tensor=tensor, **common)

    def _fallback_kind(self) -> str:
        mode = self.config.fallback
        if mode == "inline":
            return KIND_INLINE
        if mode == "object":
            return KIND_OBJECT
        ray = sys.modules.get("ray")  # not imported means not running inside Ray
        return KIND_OBJECT if ray is not None and ray.is_initialized() else KIND_INLINE

    # -- helpers ------------------------------------------------------------------------------------
    def _count_hit(self, level: str) -> None:
        if level == "lru":
            self.stats.hits_lru += 1
        else:
            self.stats.hits_shared += 1
        self.metrics.cache_lookups.labels(self.label, level, "hit").inc()
        self.metrics.images.labels(self.label, "hit").inc()

    def _tiler(
        self, data: bytes, tiling: TilingParams, ctx: RequestContext | None
    ) -> Callable[[], Awaitable[TiledImage]]:
        async def tile() -> TiledImage:
            (tiled,) = await self.tile_source.tile([(data, tiling)], ctx)  # type: ignore[union-attr]
            return tiled

        return tile

    def _video_tiler(
        self, clip: VideoClip, ctx: RequestContext | None
    ) -> Callable[[], Awaitable[TiledImage]]:
        async def tile() -> TiledImage:
            return await self.tile_source.tile_video(clip, ctx)  # type: ignore[union-attr]

        return tile

    def _check_tiled(self, image: TiledImage, frames: int = 1) -> None:
        tiles = image.tiles
        s = self.encoder.tile_size
        if (
            not isinstance(tiles, np.ndarray)
            or tiles.dtype != np.uint8
            or tiles.ndim != 4
            or tiles.shape[1:] != (s, s, 3)
        ):
            shape = getattr(tiles, "shape", None)
            raise InvalidArgument(
                f"tiles must be uint8 (N, {s}, {s}, 3), got {getattr(tiles, 'dtype', '?')} {shape}"
            )
        most = self.config.max_tiles_per_image * frames
        if not frames <= tiles.shape[0] <= most or tiles.shape[0] % frames:
            raise InvalidArgument(
                f"an image of {frames} frame(s) has {tiles.shape[0]} tiles; {frames}..{most} are accepted"
            )

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(tiles)

    async def cache_available(self) -> bool:
        """Whether the shared cache is usable now (False without one)."""
        available = self.shared is not None and await self.shared.healthy()
        self.metrics.cache_available.labels(self.label).set(int(available))
        return available


def _inlined(ref: EmbeddingRef, entry: StoredEmbedding) -> EmbeddingRef:
    if ref.kind == KIND_INLINE:
        return ref
    return ref.with_kind(KIND_INLINE, tensor=entry.concat(), object_ref=None)


def _ready(image: TiledImage) -> Callable[[], Awaitable[TiledImage]]:
    async def get() -> TiledImage:
        return image

    return get


def _tiles_sha256(tiles: np.ndarray) -> str:
    h = hashlib.sha256(f"tiles:{tiles.shape}:".encode())
    h.update(np.ascontiguousarray(tiles).data)
    return h.hexdigest()


def _store_observer(metrics: EncoderMetrics, label: str) -> Callable[[str], None]:
    gauge = metrics.cache_available.labels(label)
    events = {}

    def observe(event: str) -> None:
        counter = events.get(event)
        if counter is None:
            counter = events[event] = metrics.store_events.labels(label, event)
        counter.inc()
        if event == "breaker_open":
            gauge.set(0)
        elif event == "breaker_closed":
            gauge.set(1)

    gauge.set(1)
    return observe


def _frames(image: ImageInput | VideoClip) -> int:
    return image.frames if isinstance(image, VideoClip) else 1


def _header_tiles(image: ImageInput | VideoClip) -> int:
    """The tiles an image (or a video's frames, at most) will take, from headers alone (no pixels)."""
    from services.preprocess.config import DecodeLimits, VideoLimits
    from services.preprocess.decoding import open_image
    from services.preprocess.tiling import count_tiles

    if isinstance(image, VideoClip):
        from services.preprocess.video_tiling import check_clip

        return check_clip(image, VideoLimits())[1]
    if not image.data:
        raise InvalidArgument("an image has no bytes")
    header = open_image(image.data, DecodeLimits())
    return count_tiles(header.width, header.height, image.tiling.validate())
