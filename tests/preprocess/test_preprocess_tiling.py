"""Dynamic tiling against an independent copy of the reference: every grid and every pixel."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.types import TiledImage, TilingParams
from services.demo.reference import reference_grid, reference_tiles
from services.preprocess.config import DecodeLimits
from services.preprocess.decoding import decode_image
from services.preprocess.tiling import count_tiles, find_grid, tile_image
from tests.support.images import encode, photo_like

# INTERNVL.md, "Examples": W x H @ max_num -> (cols, rows), tiles including the thumbnail.
EXAMPLES = [
    (448, 448, 12, (1, 1), 1),
    (1920, 1080, 12, (4, 2), 9),
    (1920, 1080, 40, (7, 4), 29),
    (634, 634, 12, (2, 2), 5),
    (4000, 100, 12, (12, 1), 13),
    (10, 10, 40, (1, 1), 1),
]


@pytest.mark.parametrize(("width", "height", "max_num", "grid", "tiles"), EXAMPLES)
def test_examples_table(width: int, height: int, max_num: int, grid: tuple[int, int], tiles: int) -> None:
    params = TilingParams(max_num=max_num)
    assert find_grid(width, height, params) == grid
    assert reference_grid(width, height, 1, max_num) == grid
    assert count_tiles(width, height, params) == tiles


def _exact_fraction_grid(width: int, height: int, max_num: int, size: int = 448) -> tuple[int, int]:
    """The same walk in exact rational arithmetic: what a 'cleaner' port would do."""
    aspect = Fraction(width, height)
    best, best_diff = (1, 1), None
    for cols, rows in sorted(
        {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num},
        key=lambda g: g[0] * g[1],
    ):
        diff = abs(aspect - Fraction(cols, rows))
        if best_diff is None or diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > Fraction(size * size * cols * rows, 2):
            best = (cols, rows)
    return best


@pytest.mark.parametrize(
    ("width", "height", "max_num", "float_grid", "fraction_grid"),
    [(11, 60, 6, (1, 6), (1, 5)), (338, 2184, 12, (1, 6), (1, 7))],
)
def test_float_midpoints_follow_the_reference(
    width: int, height: int, max_num: int, float_grid: tuple[int, int], fraction_grid: tuple[int, int]
) -> None:
    assert reference_grid(width, height, 1, max_num) == float_grid
    assert find_grid(width, height, TilingParams(max_num=max_num)) == float_grid
    assert _exact_fraction_grid(width, height, max_num) == fraction_grid


def test_grid_matches_reference_on_all_small_sizes() -> None:
    for max_num in (1, 2, 6, 12):
        params = TilingParams(max_num=max_num)
        for width in range(1, 61):
            for height in range(1, 61):
                assert find_grid(width, height, params) == reference_grid(width, height, 1, max_num)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    max_num=st.integers(1, 40),
    min_num=st.integers(1, 40),
    tile_size=st.sampled_from([224, 448]),
)
def test_grid_matches_reference_on_random_sizes(
    width: int, height: int, max_num: int, min_num: int, tile_size: int
) -> None:
    min_num = min(min_num, max_num)
    params = TilingParams(min_num=min_num, max_num=max_num, tile_size=tile_size)
    grid = find_grid(width, height, params)
    assert grid == reference_grid(width, height, min_num, max_num, tile_size)
    assert min_num <= grid[0] * grid[1] <= max_num or grid == (1, 1)


def _check_pixels(img: Image.Image, params: TilingParams, fmt: str = "PNG") -> TiledImage:
    data = encode(img, fmt)
    ours = tile_image(decode_image(data, DecodeLimits()), params)
    ref = reference_tiles(data, params.min_num, params.max_num, params.tile_size, params.use_thumbnail)
    assert ours.tiles.dtype == np.uint8
    assert ours.tiles.shape == ref.shape
    np.testing.assert_array_equal(ours.tiles, ref)
    return ours


PIXEL_CASES = [
    (1, 1, 12),
    (10, 10, 40),
    (4000, 100, 12),
    (100, 4000, 12),
    (896, 448, 12),
    (448, 448, 12),
    (634, 634, 12),
    (11, 60, 6),
    (338, 2184, 12),
    (1920, 1080, 12),
    (1920, 1080, 40),
    (1, 300, 12),
    (3, 1, 40),
]


@pytest.mark.parametrize(("width", "height", "max_num"), PIXEL_CASES)
def test_pixels_match_reference(width: int, height: int, max_num: int) -> None:
    ours = _check_pixels(photo_like(width, height, seed=width * 7 + height), TilingParams(max_num=max_num))
    assert ours.grid == reference_grid(width, height, 1, max_num)
    assert (ours.width, ours.height) == (width, height)


def test_pixels_match_reference_on_random_grids() -> None:
    rng = random.Random(1234)
    for _ in range(16):
        width, height = rng.randint(1, 600), rng.randint(1, 600)
        max_num = rng.randint(1, 12)
        min_num = rng.randint(1, max_num)
        use_thumbnail = rng.random() < 0.8
        params = TilingParams(min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail)
        _check_pixels(photo_like(width, height, seed=rng.randint(0, 10**6)), params)


def test_jpeg_pixels_match_reference() -> None:
    _check_pixels(photo_like(1280, 720, seed=3), TilingParams(max_num=12), fmt="JPEG")


def test_other_tile_size_matches_reference() -> None:
    _check_pixels(photo_like(500, 300, seed=4), TilingParams(max_num=8, tile_size=224))


def test_without_thumbnail() -> None:
    ours = _check_pixels(photo_like(900, 450, seed=5), TilingParams(max_num=12, use_thumbnail=False))
    assert ours.grid == (2, 1)
    assert ours.num_tiles == 2
    assert not ours.has_thumbnail


def test_tiled_image_facts() -> None:
    tiled = tile_image(photo_like(1920, 1080, seed=6), TilingParams(), sha256="ab" * 32)
    assert tiled.grid == (4, 2)
    assert tiled.num_tiles == 9
    assert tiled.has_thumbnail
    assert tiled.num_image_tokens() == 9 * 256
    assert tiled.num_image_tokens(64) == 9 * 64
    assert (tiled.width, tiled.height, tiled.sha256) == (1920, 1080, "ab" * 32)
    assert tiled.tiles.flags.c_contiguous and tiled.tiles.flags.writeable


def test_single_tile_has_no_thumbnail() -> None:
    tiled = tile_image(photo_like(448, 448), TilingParams())
    assert tiled.grid == (1, 1)
    assert tiled.num_tiles == 1
    assert not tiled.has_thumbnail


def test_tile_order_is_row_major() -> None:
    # A 2x2 image of four flat colours, resized to a 2x2 grid: tile k is (row k // 2, column k % 2).
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    big = Image.fromarray(colours.repeat(448, axis=0).repeat(448, axis=1), "RGB")
    tiled = tile_image(big, TilingParams(max_num=4))
    assert tiled.grid == (2, 2)
    for k, colour in enumerate(colours.reshape(4, 3)):
        centre = tiled.tiles[k, 224, 224]
        np.testing.assert_array_equal(centre, colour)


def test_rejects_non_rgb_and_bad_params() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tile_image(Image.new("L", (10, 10)), TilingParams())
    with pytest.raises(ValueError):
        find_grid(0, 10, TilingParams())
    from services.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        tile_image(Image.new("RGB", (10, 10)), TilingParams(max_num=0))


def test_area_tie_rule_prefers_more_tiles_only_for_large_images() -> None:
    # 2:1 at max 8: (2, 1) and (4, 2) match exactly; the reference moves on to (4, 2) only when
    # area > 0.5 * S^2 * 8 = 802816.
    params = TilingParams(max_num=8)
    assert find_grid(896, 448, params) == reference_grid(896, 448, 1, 8) == (2, 1)
    assert find_grid(1800, 900, params) == reference_grid(1800, 900, 1, 8) == (4, 2)
