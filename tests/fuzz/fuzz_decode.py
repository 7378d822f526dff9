"""Fuzz target for image decoding: ``decode_image`` must turn every byte string into either an RGB
image within the limits or an ``InvalidArgument``; any other exception escaping it is a crash.

Run with atheris (libFuzzer):

    python tests/fuzz/fuzz_decode.py [CORPUS_DIR ...] -max_total_time=60 -timeout=10

``write_seeds(dir)`` fills a corpus directory with one small valid image per allowed format, so the
mutations start inside every decoder instead of at the magic-byte check. The pixel limit is lowered
to 4 M pixels so that one input never costs more than a few milliseconds of decoding; the checks are
the same at any limit.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

from services.common.errors import InvalidArgument
from services.preprocess.config import DecodeLimits

# Coverage feedback from Pillow's Python side (format plugins, header parsers) and our decoding
# module; pydantic and the rest are imported above, uninstrumented, to keep start-up short.
with atheris.instrument_imports(include=["PIL", "services.preprocess.decoding"]):
    from PIL import (  # noqa: F401 - the plugins Image.open would import later, uninstrumented
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    from services.preprocess.decoding import decode_image

LIMITS = DecodeLimits(max_image_bytes=1024 * 1024, max_pixels=4_000_000)
SEED_FORMATS = {"PNG": {}, "JPEG": {"quality": 70}, "GIF": {}, "BMP": {}, "TIFF": {}, "WEBP": {"quality": 50}}


def test_one_input(data: bytes) -> None:
    try:
        img = decode_image(data, LIMITS)
    except InvalidArgument:
        return
    if img.mode != "RGB":
        raise AssertionError(f"decode_image returned mode {img.mode!r}")
    width, height = img.size
    if not (width >= 1 and height >= 1 and width * height <= LIMITS.max_pixels):
        raise AssertionError(f"decode_image returned a {width}x{height} image past the limits")


def write_seeds(directory: str | Path) -> list[Path]:
    """One small image per allowed format (RGB, palette and alpha modes mixed in)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = Image.new("RGB", (23, 17))
    base.putdata([(x * 11 % 256, y * 15 % 256, (x * y) % 256) for y in range(17) for x in range(23)])
    out = []
    for k, (fmt, options) in enumerate(SEED_FORMATS.items()):
        img = base.convert("P") if fmt == "GIF" else base.convert("RGBA") if fmt == "PNG" else base
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        path = directory / f"seed{k}.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        out.append(path)
    return out


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
