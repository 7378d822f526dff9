"""The reference InternVL preprocessing (``services.demo.reference``) and the synthetic images the
tests and the benchmark use."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from services.demo.reference import (  # noqa: F401  (re-exported for the tests)
    IMAGENET_MEAN,
    IMAGENET_STD,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    reference_grid,
    reference_load_image,
    reference_tile_images,
    reference_tiles,
    target_ratios,
    to_tensor_normalize,
)


def photo_like(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A synthetic image with smooth gradients, a few shapes and noise, so JPEG behaves as on photos."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 6.28, size=3).astype(np.float32)
    channels = [
        127 + 60 * np.sin(6 * x + phase[c]) * np.cos(4 * y + phase[c]) + 50 * (x - y) * (c - 1)
        for c in range(3)
    ]
    img = np.stack(channels, axis=-1)
    img += rng.normal(0.0, 12.0, size=img.shape).astype(np.float32)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    out = Image.fromarray(arr, "RGB")
    return out if mode == "RGB" else out.convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    if fmt == "PNG":
        kwargs.setdefault("compress_level", 1)  # fast: the tests encode large noisy images
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC-32 over type + payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(
    width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, rows: bytes | None = None
) -> bytes:
    """A PNG written byte by byte, so its header can declare any size without allocating the pixels.

    ``rows`` is the unfiltered scanline data (each row prefixed by its filter byte); without it the
    IDAT holds a single zero-length deflate stream, enough for a header-only parse.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"")
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )
