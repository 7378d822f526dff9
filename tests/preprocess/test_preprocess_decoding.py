"""The bad-input corpus and the odd-but-valid images: each gets its documented result."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.types import TilingParams
from services.demo.reference import reference_tiles
from services.preprocess.config import DecodeLimits
from services.preprocess.decoding import decode_image, open_image, sniff_format
from services.preprocess.tiling import tile_image
from tests.support.images import encode, handmade_png, photo_like, png_chunk

LIMITS = DecodeLimits()


def _reason(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, limits)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message
    return info.value.reason


def _assert_matches_reference(data: bytes, max_num: int = 12) -> np.ndarray:
    ours = tile_image(decode_image(data, LIMITS), TilingParams(max_num=max_num)).tiles
    np.testing.assert_array_equal(ours, reference_tiles(data, max_num=max_num))
    return ours


# --- refused -------------------------------------------------------------------------------------


def test_empty() -> None:
    assert _reason(b"") == "image_empty"


def test_text_file() -> None:
    assert _reason(b"hello, this is not an image\n" * 10) == "image_format_unsupported"


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_formats_outside_the_allow_list(fmt: str) -> None:
    assert _reason(encode(photo_like(16, 16), fmt)) == "image_format_unsupported"


def test_truncated_jpeg() -> None:
    data = encode(photo_like(256, 256, seed=1), "JPEG", quality=90)
    assert _reason(data[: len(data) // 2]) == "image_corrupt"


def test_jpeg_magic_then_garbage() -> None:
    assert _reason(b"\xff\xd8\xff" + b"\x00garbage" * 20) == "image_corrupt"


def test_truncated_png() -> None:
    data = encode(photo_like(128, 128, seed=2), "PNG")
    assert _reason(data[: len(data) // 2]) == "image_corrupt"


def test_png_with_broken_pixel_stream() -> None:
    # A valid header declaring 64x64 RGB, then an IDAT that is not a deflate stream.
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(200)))
        + png_chunk(b"IEND", b"")
    )
    assert _reason(data) == "image_corrupt"


def test_png_with_short_pixel_data_is_accepted_as_pillow_does() -> None:
    # Only 10 of 64 rows, in a well-formed deflate stream: Pillow (and so the reference) fills the
    # rest with zeros instead of failing. We follow the reference.
    rows = b"".join(b"\x00" + bytes(range(192)) for _ in range(10))
    _assert_matches_reference(handmade_png(64, 64, rows=rows))


def test_declared_50000x50000_png_is_refused_from_the_header() -> None:
    data = handmade_png(50000, 50000)
    assert len(data) < 100
    assert _reason(data) == "image_too_large"


@pytest.mark.parametrize("size", [(9000, 9000), (10000, 10000)])
def test_declared_canvas_over_our_pixel_limit(size: tuple[int, int]) -> None:
    # 81 M is under Pillow's own thresholds, 100 M is in its warning band: our check decides both.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert _reason(handmade_png(*size)) == "image_too_large"


def test_pixel_limit_is_configurable() -> None:
    data = encode(photo_like(100, 100), "PNG")
    assert _reason(data, DecodeLimits(max_pixels=100 * 100 - 1)) == "image_too_large"
    assert decode_image(data, DecodeLimits(max_pixels=100 * 100)).size == (100, 100)


def test_byte_limit() -> None:
    data = encode(photo_like(100, 100), "PNG")
    assert _reason(data, DecodeLimits(max_image_bytes=len(data) - 1)) == "image_too_large"


def test_header_check_decodes_no_pixels() -> None:
    # The header says 4000x3000; the body is junk. open_image must not notice the junk.
    img = open_image(handmade_png(4000, 3000), LIMITS)
    assert img.size == (4000, 3000)


# Damaged headers make Pillow warn (bogus EXIF, canvases in its bomb-warning band); only the outcome matters.
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_images_give_invalid_argument_or_tiles(data: st.DataObject) -> None:
    """Truncations and byte flips of valid files never let a raw Pillow exception out."""
    fmt = data.draw(st.sampled_from(["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"]))
    blob = bytearray(_SMALL_FILES[fmt])
    cut = data.draw(st.integers(0, len(blob)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=4))
    for pos, value in flips:
        blob[pos] = value
    try:
        img = decode_image(bytes(blob[: max(cut, 1)]), LIMITS)
    except InvalidArgument as exc:
        assert exc.reason in {"image_empty", "image_corrupt", "image_format_unsupported", "image_too_large"}
    else:
        assert img.mode == "RGB"


_SMALL_FILES = {
    fmt: encode(photo_like(40, 30, seed=9), fmt) for fmt in ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"]
}


# --- accepted, exactly as the reference decodes them -------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format(fmt: str) -> None:
    data = encode(photo_like(500, 300, seed=3), fmt)
    assert sniff_format(data) == fmt
    _assert_matches_reference(data, max_num=6)


def test_sixteen_bit_grey_png() -> None:
    arr = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 7 % 65536).astype(np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    _assert_matches_reference(data, max_num=6)


def test_sixteen_bit_rgb_png() -> None:
    rng = np.random.default_rng(0)
    width, height = 300, 200
    pixels = rng.integers(0, 65536, size=(height, width * 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    data = handmade_png(width, height, bit_depth=16, color_type=2, rows=rows)
    _assert_matches_reference(data, max_num=6)


def test_cmyk_jpeg() -> None:
    data = encode(photo_like(400, 300, seed=4, mode="CMYK"), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    _assert_matches_reference(data, max_num=6)


def test_palette_png_with_transparency() -> None:
    img = photo_like(300, 300, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = encode(img, "PNG", transparency=3)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 3
    _assert_matches_reference(data, max_num=6)


def test_rgba_png_drops_alpha_without_compositing() -> None:
    rgba = photo_like(200, 200, seed=6).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: compositing on white would change every pixel
    data = encode(rgba, "PNG")
    decoded = decode_image(data, LIMITS)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(rgba)[..., :3])
    _assert_matches_reference(data)


def test_animated_gif_uses_first_frame() -> None:
    frames = [photo_like(300, 200, seed=s).convert("P") for s in (10, 11, 12)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    ours = _assert_matches_reference(data, max_num=6)
    first = tile_image(frames[0].convert("RGB"), TilingParams(max_num=6)).tiles
    np.testing.assert_array_equal(ours, first)


def test_exif_orientation_is_not_applied() -> None:
    img = photo_like(400, 200, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMITS).size == (400, 200)
    _assert_matches_reference(data)


def test_one_pixel_image() -> None:
    tiles = _assert_matches_reference(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert tiles.shape == (1, 448, 448, 3)
    assert (tiles == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_very_wide_image() -> None:
    tiles = _assert_matches_reference(encode(photo_like(10000, 10, seed=8), "PNG"))
    assert tiles.shape == (13, 448, 448, 3)


def test_grayscale_and_bilevel() -> None:
    _assert_matches_reference(encode(photo_like(300, 200, seed=13, mode="L"), "PNG"), max_num=4)
    _assert_matches_reference(encode(photo_like(300, 200, seed=14, mode="1"), "BMP"), max_num=4)
