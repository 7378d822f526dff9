"""The built-in images and prompts of ``verify``: made in code, so nothing is downloaded or shipped.

Sizes and aspect ratios are chosen so that the default ``max_num`` (12) gives several grids: 1x1
(one tile, no thumbnail), 4x2, 1x2, 2x3 (a small image scaled up), 4x1 and 2x1. The pictures are
simple shapes, gradients and patterns a real model can describe; PNG keeps every pixel exact.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PROMPTS = (
    "Describe this image in one sentence.",
    "What shapes and colours do you see?",
    "How many distinct regions does this picture have?",
)


@dataclass(frozen=True)
class BuiltinImage:
    name: str
    png: bytes
    width: int
    height: int


def _gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom, blue along the diagonal."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)  # (H, W)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)  # (H, W)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1)  # (H, W, 3)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _stripes(width: int, height: int) -> Image.Image:
    """Diagonal stripes in four colours."""
    colours = np.array([[230, 57, 70], [241, 250, 238], [69, 123, 157], [29, 53, 87]], dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]  # (H, W) each
    return Image.fromarray(colours[((xx + yy) // 40) % 4], "RGB")  # (H, W) -> (H, W, 3)


def _shapes(width: int, height: int) -> Image.Image:
    """A circle, a square and a triangle on a light background."""
    img = Image.new("RGB", (width, height), (245, 240, 225))
    draw = ImageDraw.Draw(img)
    u = min(width, height)
    draw.ellipse((u // 10, u // 10, u // 10 + u * 2 // 3, u // 10 + u * 2 // 3), fill=(220, 40, 40))
    draw.rectangle((width // 6, height // 2, width // 6 + u // 2, height // 2 + u // 2), fill=(40, 90, 200))
    draw.polygon(
        [(width // 2, height - u // 8), (width - u // 8, height - u // 2), (width - u // 8, height - u // 8)],
        fill=(30, 160, 60),
    )
    return img


def _checkerboard(width: int, height: int) -> Image.Image:
    """Black and yellow squares of 25 pixels."""
    yy, xx = np.mgrid[0:height, 0:width]  # (H, W) each
    on = ((xx // 25) + (yy // 25)) % 2 == 1
    rgb = np.where(on[..., None], np.array([250, 210, 40], np.uint8), np.array([20, 20, 20], np.uint8))
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _rings(width: int, height: int) -> Image.Image:
    """Concentric rings around the centre, blue on white."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (2, H, W)
    r = np.hypot(xx - width / 2, yy - height / 2)
    on = (r // 30) % 2 == 0
    rgb = np.where(on[..., None], np.array([30, 60, 200], np.uint8), np.array([255, 255, 255], np.uint8))
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# (name, painter, width, height) in the order ``--images N`` takes them.
_CATALOGUE: tuple[tuple[str, Callable[[int, int], Image.Image], int, int], ...] = (
    ("gradient-448x448", _gradient, 448, 448),
    ("stripes-1280x720", _stripes, 1280, 720),
    ("shapes-480x960", _shapes, 480, 960),
    ("checkerboard-200x300", _checkerboard, 200, 300),
    ("rings-1600x400", _rings, 1600, 400),
    ("shapes-896x448", _shapes, 896, 448),
)

MAX_IMAGES = len(_CATALOGUE)


def builtin_images(count: int) -> list[BuiltinImage]:
    """The first ``count`` built-in images as PNG bytes (1 <= count <= ``MAX_IMAGES``)."""
    out = []
    for name, paint, width, height in _CATALOGUE[:count]:
        buf = io.BytesIO()
        paint(width, height).save(buf, format="PNG")
        out.append(BuiltinImage(name, buf.getvalue(), width, height))
    return out


def prompt_for(index: int) -> str:
    """The question asked about the ``index``-th image."""
    return PROMPTS[index % len(PROMPTS)]
