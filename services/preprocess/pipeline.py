"""The preprocess pool: a request's images in, uint8 tiles out.

``Preprocessor`` enforces the per-request caps, then decodes and tiles the images on a thread pool.

Why threads and not processes: the expensive steps (JPEG/PNG decoding, the two bicubic resizes,
SHA-256) run in C with the GIL released, so threads scale across cores, and the tiles come back by
reference. A process pool has to pickle every image's tiles back to the caller (~5 MB for a 9-tile
image). Measured with ``benchmarks/preprocess_bench.py`` (2 workers, 2-core machine, best of 3):
5.4 images/s with threads against 4.7 with processes for our pipeline, and 4.1 against 3.1 for the
reference's; the figures are in ``benchmarks/results/preprocess.json``.

Each image is three pool tasks: decode, then the grid resize and the thumbnail resize side by side
(both read the decoded image; neither needs the other). When the pool has idle threads a single large
image finishes sooner; under load the tasks just queue like any others. No pool thread ever waits on
another task (the follow-up tasks are chained with callbacks), so the pool cannot deadlock itself.

Caps are checked in two steps so a bad request costs as little as possible: the image count first,
then every image's header is parsed (``open_image``: size and format, no pixels) and the total tile
count is computed from the sizes alone, all before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from services.common.errors import InvalidArgument
from services.common.types import TiledImage, TilingParams, VideoClip, sha256_hex
from services.preprocess.config import PreprocessConfig
from services.preprocess.decoding import load_rgb, open_image
from services.preprocess.tiling import count_tiles, fill_grid, fill_thumbnail, plan_tiles
from services.preprocess.video_tiling import tile_clip

T = TypeVar("T")

REASON_TOO_MANY_IMAGES = "too_many_images"
REASON_TOO_MANY_TILES = "too_many_tiles"


@dataclass
class _Job:
    """One image of a request after the header check: ready to decode and tile."""

    index: int
    data: bytes
    params: TilingParams
    image: Image.Image  # lazy: header parsed, pixels not decoded


class Preprocessor:
    """Decodes and tiles images on a bounded thread pool; safe to share between request handlers.

    The pool size (``config.workers``) bounds the CPU this service uses however many requests are in
    flight; callers wait on futures and do no pixel work themselves.
    """

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config if config is not None else PreprocessConfig()
        self._pool = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="preprocess")

    def close(self) -> None:
        """Wait for work in flight, then release the threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tile_images(self, items: Sequence[tuple[bytes, TilingParams]]) -> list[TiledImage]:
        """Tile every image of one request, in order. Raises ``InvalidArgument`` for any bad image."""
        jobs = self._plan(items)
        return _collect([self._submit(job) for job in jobs])

    async def atile_images(self, items: Sequence[tuple[bytes, TilingParams]]) -> list[TiledImage]:
        """``tile_images`` for an asyncio caller: the header checks and the pixel work run on the pool."""
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self._pool, self._plan, items)
        futures = [self._submit(job) for job in jobs]
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def tile_video(self, clip: VideoClip) -> TiledImage:
        """Decode and tile a video's sampled frames (``video_tiling.tile_clip``) on the pool."""
        return self._pool.submit(tile_clip, clip, self.config).result()

    async def atile_video(self, clip: VideoClip) -> TiledImage:
        """``tile_video`` for an asyncio caller: probe, decode and tiling run on one pool thread."""
        return await asyncio.wrap_future(self._pool.submit(tile_clip, clip, self.config))

    def _submit(self, job: _Job) -> Future[TiledImage]:
        """Decode on the pool, then run the grid and thumbnail resizes as two further pool tasks.

        The follow-ups are chained with done-callbacks (run on the pool thread that finished the
        step), so the returned future completes without any pool thread blocking on another.
        """
        result: Future[TiledImage] = Future()

        def on_decoded(decoded: Future[Image.Image]) -> None:
            if not _forward_failure(decoded, result):
                return
            rgb = decoded.result()
            plan = plan_tiles(rgb.width, rgb.height, job.params)
            tiles = plan.allocate()
            steps = [fill_grid, fill_thumbnail] if plan.thumbnail else [fill_grid]
            pending = _Countdown(len(steps))

            def on_filled(step: Future[None]) -> None:
                if _forward_failure(step, result) and pending.done_one():
                    _settle(result, TiledImage(tiles, plan.grid, rgb.width, rgb.height, sha256_hex(job.data)))

            for step in steps:
                task = self._pool.submit(_guarded, job.index, step, rgb, plan, tiles)
                task.add_done_callback(_settling(result, on_filled))

        task = self._pool.submit(_guarded, job.index, load_rgb, job.image)
        task.add_done_callback(_settling(result, on_decoded))
        return result

    def _plan(self, items: Sequence[tuple[bytes, TilingParams]]) -> list[_Job]:
        """Check the request's caps and every image's header; no pixel is decoded here."""
        cfg = self.config
        if len(items) > cfg.max_images_per_request:
            raise InvalidArgument(
                f"request has {len(items)} images, over the limit of {cfg.max_images_per_request}",
                reason=REASON_TOO_MANY_IMAGES,
            )
        jobs: list[_Job] = []
        total_tiles = 0
        for index, (data, params) in enumerate(items):
            with _about_image(index):
                params.validate()
                image = open_image(data, cfg.limits)
            total_tiles += count_tiles(image.width, image.height, params)
            jobs.append(_Job(index=index, data=data, params=params, image=image))
        if total_tiles > cfg.max_tiles_per_request:
            raise InvalidArgument(
                f"request would produce {total_tiles} tiles, over the limit of {cfg.max_tiles_per_request}; "
                "lower max_num or send fewer images",
                reason=REASON_TOO_MANY_TILES,
            )
        return jobs


def _guarded(index: int, fn: Callable[..., T], *args: object) -> T:
    with _about_image(index):
        return fn(*args)


class _Countdown:
    """Counts finished steps across pool threads; says which call finished the last one."""

    def __init__(self, steps: int) -> None:
        self._left = steps
        self._lock = threading.Lock()

    def done_one(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


def _settling(
    result: Future[TiledImage], callback: Callable[[Future[T]], None]
) -> Callable[[Future[T]], None]:
    """Wrap a done-callback so anything it raises fails ``result`` (the executor would only log it)."""

    def run(step: Future[T]) -> None:
        try:
            callback(step)
        except BaseException as exc:  # includes RuntimeError from submit() after shutdown
            _settle(result, exc=exc)

    return run


def _forward_failure(step: Future[object], result: Future[TiledImage]) -> bool:
    """True when ``step`` succeeded and ``result`` still waits; otherwise settles ``result``."""
    if step.cancelled():
        result.cancel()
        return False
    exc = step.exception()
    if exc is not None:
        _settle(result, exc=exc)
        return False
    return not result.done()


def _settle(
    result: Future[TiledImage], value: TiledImage | None = None, *, exc: BaseException | None = None
) -> None:
    """Complete ``result`` unless it is already complete (cancelled by the caller, or failed first)."""
    try:
        if exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(value)
    except InvalidStateError:
        pass


def _collect(futures: list[Future[TiledImage]]) -> list[TiledImage]:
    """Results in order; on the first failure, cancel what has not started and re-raise."""
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


@contextmanager
def _about_image(index: int) -> Iterator[None]:
    """Prefix errors with the image's position in the request, so the caller knows which to fix."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"image {index}: {exc.message}", reason=exc.reason) from exc
