"""The mutations the accuracy tests apply are what they claim: tiles reversed with the thumbnail kept
last, the thumbnail dropped, and swap partners that are other images with the same tile count."""

import numpy as np

from services.demo.evaluate import drop_thumbnail, permute_tiles, swap_partners
from services.demo.inputs import reference_pixels
from services.demo.task import heldout


def _tiles(n):
    return np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((n, 3, 2, 2), np.float32)


def test_permute_reverses_the_grid_and_keeps_the_thumbnail_last():
    got = permute_tiles(_tiles(5))[:, 0, 0, 0].tolist()
    assert got == [3, 2, 1, 0, 4]
    assert permute_tiles(_tiles(1)).shape[0] == 1


def test_drop_thumbnail_removes_only_the_last_tile():
    assert drop_thumbnail(_tiles(3))[:, 0, 0, 0].tolist() == [0, 1]
    assert drop_thumbnail(_tiles(1)).shape[0] == 1  # a one-tile image has no thumbnail


def test_swap_partners_are_other_images_with_the_same_tile_count():
    samples = heldout(3)
    pixels = [reference_pixels(s.image) for s in samples]
    partners = swap_partners(samples, pixels)
    for i, j in enumerate(partners):
        assert j != i and len(pixels[j]) == len(pixels[i])
        assert samples[j].png() != samples[i].png()
