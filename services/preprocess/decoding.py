"""Image decoding with hard limits, pixel-identical with ``Image.open(BytesIO(data)).convert('RGB')``.

The reference decodes with exactly that call, so we do too: alpha is dropped without compositing,
EXIF orientation is not applied, an animated GIF gives its first frame, and palette, CMYK, 16-bit
and grayscale images become RGB the way Pillow's ``convert`` does it. Anything else would change the
tiles and therefore the embeddings.

What we add is the guard rails, checked as early as they can be:

1. empty input and the byte limit, before anything is parsed;
2. the format, from the magic bytes, against a short allow-list (JPEG, PNG, WebP, GIF, BMP, TIFF);
3. the pixel limit, from the header (``Image.open`` is lazy), before any pixel is decoded, so a tiny
   file declaring a 50000x50000 canvas costs nothing;
4. the decode itself, where truncated or corrupt data fails.

Pillow's own decompression-bomb check runs inside ``Image.open`` with a higher threshold than any
limit ``DecodeLimits`` allows, so our check decides for every image Pillow lets through; images
Pillow refuses itself are mapped to the same reason. Truncated images are refused (Pillow's default;
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone). Every failure is an ``InvalidArgument`` with one of
the reasons below; no Pillow exception escapes.
"""

from __future__ import annotations

import io

from PIL import Image

from services.common.errors import InvalidArgument
from services.preprocess.config import DecodeLimits

REASON_EMPTY = "image_empty"
REASON_TOO_LARGE = "image_too_large"
REASON_UNSUPPORTED = "image_format_unsupported"
REASON_CORRUPT = "image_corrupt"

# Pillow format ids tried by Image.open, in the order it tries them.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"MM*\x00", b"II\x00*")


def sniff_format(data: bytes) -> str | None:
    """The allowed format the magic bytes announce, or None.

    Used to tell "not an image we take" (unsupported) from "one of ours, but broken" (corrupt).
    """
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in _TIFF_MAGIC:
        return "TIFF"
    return None


def open_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Parse only the header of ``data`` and check every bound that needs no pixels.

    Returns Pillow's lazy image: its size and mode are known, its pixels are not decoded yet.
    """
    if not data:
        raise InvalidArgument("image is empty (0 bytes)", reason=REASON_EMPTY)
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(
            f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes",
            reason=REASON_TOO_LARGE,
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidArgument(
            f"not a supported image format (supported: {', '.join(ALLOWED_FORMATS)})",
            reason=REASON_UNSUPPORTED,
        )
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(
            f"image declares too many pixels (limit {limits.max_pixels}): {exc}", reason=REASON_TOO_LARGE
        ) from exc
    except Exception as exc:
        raise InvalidArgument(f"{fmt} image header cannot be read: {exc}", reason=REASON_CORRUPT) from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidArgument(f"{fmt} image declares an empty canvas {width}x{height}", reason=REASON_CORRUPT)
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
            reason=REASON_TOO_LARGE,
        )
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from ``open_image`` and convert them to RGB like the reference.

    An image that is already RGB is returned as loaded: ``convert('RGB')`` would only copy it.
    """
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(
            f"image frame declares too many pixels: {exc}", reason=REASON_TOO_LARGE
        ) from exc
    except Exception as exc:
        fmt = img.format or "image"
        raise InvalidArgument(f"{fmt} data cannot be decoded: {exc}", reason=REASON_CORRUPT) from exc


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode encoded image bytes to an RGB Pillow image, exactly as the reference does, within limits."""
    return load_rgb(open_image(data, limits))
