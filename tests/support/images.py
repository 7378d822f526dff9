"""The synthetic images the tests and the benchmarks use: random noise (blocky or per pixel), a solid
colour, photo-like gradients, and PNGs written byte by byte with any header.

The makers are deterministic: the same arguments give the same bytes, which some tests rely on (sizes,
tile counts, cache keys). ``png`` with its defaults is the suites' everyday image.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def noise(
    width: int, height: int, seed: int = 0, *, block: int = 16, high: int = 255, resample: str = "bilinear"
) -> Image.Image:
    """Random RGB noise of ``width`` x ``height``: one random colour (``0 <= c < high``) per ``block`` x
    ``block`` cell, resized with ``resample`` (``block=1``: every pixel random, nothing resized)."""
    rng = np.random.default_rng(seed)
    cells = (max(height // block, 1), max(width // block, 1), 3)
    img = Image.fromarray(rng.integers(0, high, size=cells, dtype=np.uint8))
    return img if img.size == (width, height) else img.resize((width, height), RESAMPLE[resample])


def solid(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


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
    """``img`` in ``fmt`` with Pillow's save options ``kwargs``; a PNG at compression level 1 unless
    told (fast: the tests encode large noisy images)."""
    if fmt == "PNG":
        kwargs.setdefault("compress_level", 1)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(
    width: int, height: int, seed: int = 0, *, colour: tuple[int, int, int] | None = None, **noise_options
) -> Image.Image:
    """:func:`solid` in ``colour`` if given, else :func:`noise` (blocks of 16 pixels unless told)."""
    return solid(width, height, colour) if colour else noise(width, height, seed, **noise_options)


def png(width: int, height: int, seed: int = 0, *, compress_level: int = -1, **options) -> bytes:
    """A :func:`picture` as PNG, at Pillow's default compression (-1) unless told."""
    return encode(picture(width, height, seed, **options), "PNG", compress_level=compress_level)


def jpeg(width: int, height: int, seed: int = 0, *, quality: int = 90, **options) -> bytes:
    """A :func:`picture` as JPEG."""
    return encode(picture(width, height, seed, **options), "JPEG", quality=quality)


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
