"""The request-level pipeline: caps, order, error attribution, sync and async paths."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.types import TilingParams, sha256_hex
from services.demo.reference import reference_tiles
from services.preprocess.config import DecodeLimits, PreprocessConfig
from services.preprocess.pipeline import Preprocessor
from tests.support.images import encode, handmade_png, photo_like

WIDE = encode(photo_like(1000, 500, seed=1), "JPEG")  # 2x1 + thumbnail = 3 tiles at max 12
SQUARE = encode(photo_like(300, 300, seed=2), "PNG")  # 1 tile
TALL = encode(photo_like(200, 700, seed=3), "WEBP")  # 1x4 + thumbnail at max 6


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    with Preprocessor(PreprocessConfig(workers=2, max_images_per_request=4, max_tiles_per_request=20)) as p:
        yield p


def _items() -> list[tuple[bytes, TilingParams]]:
    return [(WIDE, TilingParams()), (SQUARE, TilingParams()), (TALL, TilingParams(max_num=6))]


def _check(results, items) -> None:
    assert len(results) == len(items)
    for tiled, (data, params) in zip(results, items, strict=True):
        np.testing.assert_array_equal(tiled.tiles, reference_tiles(data, max_num=params.max_num))
        assert tiled.sha256 == sha256_hex(data)


def test_results_in_request_order_and_exact(pre: Preprocessor) -> None:
    items = _items()
    results = pre.tile_images(items)
    _check(results, items)
    assert [t.num_tiles for t in results] == [3, 1, 5]


def test_async_variant(pre: Preprocessor) -> None:
    items = _items()
    results = asyncio.run(pre.atile_images(items))
    _check(results, items)


def test_empty_request(pre: Preprocessor) -> None:
    assert pre.tile_images([]) == []


def test_too_many_images(pre: Preprocessor) -> None:
    with pytest.raises(InvalidArgument) as info:
        pre.tile_images([(SQUARE, TilingParams())] * 5)
    assert info.value.reason == "too_many_images"


def test_too_many_tiles_is_decided_from_headers(pre: Preprocessor) -> None:
    # Headers say 4000x3000 (4x3 + thumbnail = 13 tiles) twice; the pixel data is junk. The cap must
    # trip before any decoding would have found the junk.
    bogus = handmade_png(4000, 3000)
    with pytest.raises(InvalidArgument) as info:
        pre.tile_images([(bogus, TilingParams()), (bogus, TilingParams())])
    assert info.value.reason == "too_many_tiles"
    assert "26" in info.value.message


def test_async_caps(pre: Preprocessor) -> None:
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(pre.atile_images([(SQUARE, TilingParams())] * 5))
    assert info.value.reason == "too_many_images"


def test_error_names_the_image(pre: Preprocessor) -> None:
    items = [(SQUARE, TilingParams()), (b"not an image", TilingParams())]
    with pytest.raises(InvalidArgument) as info:
        pre.tile_images(items)
    assert info.value.reason == "image_format_unsupported"
    assert info.value.message.startswith("image 1:")


def test_decode_failure_after_planning_names_the_image(pre: Preprocessor) -> None:
    truncated = WIDE[: len(WIDE) // 2]
    with pytest.raises(InvalidArgument) as info:
        pre.tile_images([(SQUARE, TilingParams()), (truncated, TilingParams())])
    assert info.value.reason == "image_corrupt"
    assert info.value.message.startswith("image 1:")
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(pre.atile_images([(truncated, TilingParams())]))
    assert info.value.reason == "image_corrupt"


def test_invalid_tiling_params(pre: Preprocessor) -> None:
    with pytest.raises(InvalidArgument, match="max_num"):
        pre.tile_images([(SQUARE, TilingParams(max_num=41))])


def test_decode_limits_apply(pre: Preprocessor) -> None:
    small = Preprocessor(PreprocessConfig(workers=1, limits=DecodeLimits(max_pixels=1000)))
    with small, pytest.raises(InvalidArgument) as info:
        small.tile_images([(SQUARE, TilingParams())])
    assert info.value.reason == "image_too_large"


def test_shared_between_threads(pre: Preprocessor) -> None:
    items = _items()
    expected = [t.tiles for t in pre.tile_images(items)]
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                got = pre.tile_images(items)
                for a, b in zip(got, expected, strict=True):
                    np.testing.assert_array_equal(a.tiles, b)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_config_bounds() -> None:
    from pydantic import ValidationError

    assert PreprocessConfig().workers >= 1
    with pytest.raises(ValidationError):
        PreprocessConfig(workers=0)
    with pytest.raises(ValidationError):
        DecodeLimits(max_pixels=10**9)
    with pytest.raises(ValidationError):
        PreprocessConfig(max_tiles_per_request=0)
    with pytest.raises(ValidationError):
        PreprocessConfig(unknown_field=1)


@pytest.mark.timeout(60)
def test_single_worker_pool_completes() -> None:
    """Follow-up steps are chained, not awaited on the pool: one thread is enough."""
    items = _items()
    with Preprocessor(PreprocessConfig(workers=1)) as one:
        _check(one.tile_images(items), items)
        _check(asyncio.run(one.atile_images(items)), items)


def test_closed_preprocessor_refuses_work() -> None:
    pre = Preprocessor(PreprocessConfig(workers=1))
    pre.close()
    with pytest.raises(RuntimeError):
        pre.tile_images([(SQUARE, TilingParams())])
