"""Normalisation equals torchvision ToTensor + Normalize (written in numpy), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.common.types import TilingParams  # noqa: E402
from services.demo.reference import IMAGENET_MEAN, IMAGENET_STD, reference_load_image  # noqa: E402
from services.preprocess.config import DecodeLimits  # noqa: E402
from services.preprocess.decoding import decode_image  # noqa: E402
from services.preprocess.normalize import _normalize_by_table, normalize_tiles  # noqa: E402
from services.preprocess.tiling import tile_image  # noqa: E402
from tests.support.images import encode, photo_like  # noqa: E402


def _numpy_reference(tiles: np.ndarray) -> np.ndarray:
    """Per tile: HWC uint8 -> CHW float32, / 255, then (x - mean) / std, all in float32."""
    x = tiles.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


def test_every_pixel_value_in_every_channel() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tiles = np.ascontiguousarray(np.stack([values, values[::-1], values.T], axis=-1)[None])  # (1, 16, 16, 3)
    got = normalize_tiles(torch.from_numpy(tiles)).numpy()
    np.testing.assert_array_equal(got, _numpy_reference(tiles))


def test_random_tiles_fp32_exact() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 448, 448, 3), dtype=np.uint8)
    got = normalize_tiles(torch.from_numpy(tiles))
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (3, 3, 448, 448)
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), _numpy_reference(tiles))


def test_same_as_torch_arithmetic_on_cpu() -> None:
    rng = np.random.default_rng(1)
    tiles = torch.from_numpy(rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8))
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    expected = tiles.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)
    assert torch.equal(normalize_tiles(tiles), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lower_precision_is_the_cast_fp32_result(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    tiles = torch.from_numpy(rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8))
    got = normalize_tiles(tiles, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, normalize_tiles(tiles).to(dtype))


def test_end_to_end_equals_reference_load_image() -> None:
    data = encode(photo_like(1000, 600, seed=3), "JPEG")
    tiled = tile_image(decode_image(data, DecodeLimits()), TilingParams(max_num=6))
    got = normalize_tiles(torch.from_numpy(tiled.tiles)).numpy()
    np.testing.assert_array_equal(got, reference_load_image(data, max_num=6))


def test_rejects_wrong_inputs() -> None:
    with pytest.raises(TypeError):
        normalize_tiles(torch.zeros((1, 4, 4, 3), dtype=torch.float32))
    with pytest.raises(ValueError):
        normalize_tiles(torch.zeros((4, 4, 3), dtype=torch.uint8))
    with pytest.raises(ValueError):
        normalize_tiles(torch.zeros((1, 3, 4, 4), dtype=torch.uint8))


def test_table_path_equals_reference() -> None:
    """The lookup used on accelerators, exercised on the CPU."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tiles = np.ascontiguousarray(np.stack([values.T, values, values[::-1]], axis=-1)[None])
    got = _normalize_by_table(torch.from_numpy(tiles))
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), _numpy_reference(tiles))
    rng = np.random.default_rng(5)
    tiles = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        _normalize_by_table(torch.from_numpy(tiles)).numpy(), _numpy_reference(tiles)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(4)
    tiles = torch.from_numpy(rng.integers(0, 256, size=(2, 448, 448, 3), dtype=np.uint8))
    got = normalize_tiles(tiles.cuda()).cpu()
    assert torch.equal(got, normalize_tiles(tiles))
