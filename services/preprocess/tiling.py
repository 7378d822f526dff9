"""InternVL dynamic tiling, bit-identical with the reference ``dynamic_preprocess``.

The reference (OpenGVLab ``load_image``) resizes the whole RGB image once with Pillow's BICUBIC to a
grid of ``S``-pixel tiles, crops the tiles row-major and, for grids of more than one tile, appends the
whole image resized to ``S`` x ``S`` as a thumbnail. This module does the same two Pillow resizes and
nothing else: the crops are slices of one uint8 array, so the pixels are the reference's exactly and
no float work is done on the CPU (normalisation happens on the encoder's device, ``normalize.py``).

The grid choice follows ``find_closest_aspect_ratio`` literally, in float64, including the candidate
order (the reference sorts a ``set`` by tile count, and the tie rule depends on that order) and the
tie rule ``area > 0.5 * S * S * cols * rows``. An exact-fraction port picks different grids at
midpoints, so the float arithmetic is part of the contract.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.common.types import TiledImage, TilingParams


@functools.lru_cache(maxsize=1024)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """The reference's ``target_ratios``: every (cols, rows) with min_num <= cols*rows <= max_num.

    Built the way the reference builds it (a set, then a stable sort by tile count) so that equal
    counts come in the same order; Python's set order for small-int tuples is deterministic.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_grid(width: int, height: int, params: TilingParams) -> tuple[int, int]:
    """The (cols, rows) grid the reference picks for a ``width`` x ``height`` image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    size = params.tile_size
    aspect = width / height  # float64, as in the reference
    area = width * height
    best = (1, 1)
    best_diff = math.inf
    for cols, rows in candidate_grids(params.min_num, params.max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TilePlan:
    """What tiling an image of a given size will do, known from the size alone (no pixels)."""

    grid: tuple[int, int]  # (cols, rows)
    tile_size: int
    thumbnail: bool

    @property
    def blocks(self) -> int:
        """Grid tiles, thumbnail excluded."""
        return self.grid[0] * self.grid[1]

    @property
    def num_tiles(self) -> int:
        return self.blocks + int(self.thumbnail)

    def allocate(self) -> np.ndarray:
        """The uint8 (N, S, S, 3) array that ``fill_grid`` and ``fill_thumbnail`` write into."""
        return np.empty((self.num_tiles, self.tile_size, self.tile_size, 3), dtype=np.uint8)


def plan_tiles(width: int, height: int, params: TilingParams) -> TilePlan:
    """The grid and thumbnail choice for a ``width`` x ``height`` image."""
    grid = find_grid(width, height, params)
    return TilePlan(
        grid=grid, tile_size=params.tile_size, thumbnail=params.use_thumbnail and grid[0] * grid[1] > 1
    )


def count_tiles(width: int, height: int, params: TilingParams) -> int:
    """How many tiles (thumbnail included) ``tile_image`` will produce, from the size alone."""
    return plan_tiles(width, height, params).num_tiles


def fill_grid(img: Image.Image, plan: TilePlan, tiles: np.ndarray) -> None:
    """Resize the whole image once to the grid and write the grid tiles, row-major, into ``tiles``.

    Tile k is row ``k // cols``, column ``k % cols`` of the resized image: the same pixels as the
    reference's ``resized.crop(box)``, copied by slicing one array.
    """
    _require_rgb(img)
    cols, rows = plan.grid
    size = plan.tile_size
    # Image.resize defaults to BICUBIC for RGB; spelled out so a Pillow default change cannot move us.
    resized = np.asarray(img.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
    # (rows*S, cols*S, 3) -> (rows, S, cols, S, 3) -> (rows, cols, S, S, 3), written into (N, S, S, 3)
    tiles[: plan.blocks].reshape(rows, cols, size, size, 3)[...] = resized.reshape(
        rows, size, cols, size, 3
    ).transpose(0, 2, 1, 3, 4)


def fill_thumbnail(img: Image.Image, plan: TilePlan, tiles: np.ndarray) -> None:
    """Write the whole image resized to S x S as the last tile (only for plans with a thumbnail)."""
    _require_rgb(img)
    if plan.thumbnail:
        size = plan.tile_size
        tiles[plan.blocks] = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def tile_image(img: Image.Image, params: TilingParams, *, sha256: str | None = None) -> TiledImage:
    """Cut an RGB image into InternVL tiles, pixel-identical with the reference.

    The image must already be what ``Image.open(...).convert('RGB')`` gives (``decoding.py``);
    resizing any other mode would not match the reference. ``fill_grid`` and ``fill_thumbnail`` are
    independent (two resizes of the same image), so a caller with idle cores may run them in parallel.
    """
    _require_rgb(img)
    params.validate()
    width, height = img.size
    plan = plan_tiles(width, height, params)
    tiles = plan.allocate()
    fill_grid(img, plan, tiles)
    fill_thumbnail(img, plan, tiles)
    return TiledImage(tiles=tiles, grid=plan.grid, width=width, height=height, sha256=sha256)


def _require_rgb(img: Image.Image) -> None:
    if img.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {img.mode!r}")
