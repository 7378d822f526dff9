"""The preprocess pool: a request's images in, uint8 tiles out.

``Preprocessor`` enforces the per-request caps, then decodes and tiles the images on a thread pool.

Why threads and not processes: the expensive steps (JPEG/PNG decoding, the two bicubic resizes,
SHA-256) run in C with the GIL released, so threads scale across cores, and the tiles come back by
reference. A process pool has to pickle every image's tiles back to the caller (~5 MB for a 9-tile
image), which cost more than it saved when measured (``benchmarks/preprocess_bench.py`` compares
both; the figures are in ``benchmarks/results/preprocess.json``).

Caps are checked in two steps so a bad request costs as little as possible: the image count first,
then every image's header is parsed (``open_image``: size and format, no pixels) and the total tile
count is computed from the sizes alone, all before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from services.common.errors import InvalidArgument
from services.common.types import TilingParams, sha256_hex
from services.preprocess.config import PreprocessConfig
from services.preprocess.decoding import load_rgb, open_image
from services.preprocess.tiling import TiledImage, count_tiles, tile_image

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
        futures = [self._pool.submit(_run_job, job) for job in jobs]
        return _collect(futures)

    async def atile_images(self, items: Sequence[tuple[bytes, TilingParams]]) -> list[TiledImage]:
        """``tile_images`` for an asyncio caller: the header checks and the pixel work run on the pool."""
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self._pool, self._plan, items)
        tasks = [loop.run_in_executor(self._pool, _run_job, job) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

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


def _run_job(job: _Job) -> TiledImage:
    with _about_image(job.index):
        rgb = load_rgb(job.image)
        return tile_image(rgb, job.params, sha256=sha256_hex(job.data))


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
