"""Frames as the reference reads them (decord), through PyAV: on clips written here in several codecs
and containers, constant and variable frame rate, rotated; each sampled frame equals decord's frame and
the same frame decoded sequentially without seeking. Then the tiles equal ``load_video``'s, and every
bad video is refused with its reason."""

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.types import TilingParams, VideoClip
from services.demo.reference import to_tensor_normalize
from services.preprocess.config import PreprocessConfig, VideoLimits
from services.preprocess.sampling import FrameSampling, frame_indices
from services.preprocess.video import decode_frames, probe_video
from services.preprocess.video_tiling import tile_clip
from tests.support.images import png
from tests.support.videos import (
    CLIP_KINDS,
    Clip,
    decord_reader,
    huge_clip,
    long_clip,
    make_clip,
    reference_load_video,
    sequential_frames,
)

LIMITS = VideoLimits()
KINDS = [(c, f, s, vfr) for c, f, s in CLIP_KINDS for vfr in (False, True)]


def _ids(kind):
    codec, fmt, _, vfr = kind
    return f"{codec}-{fmt}-{'vfr' if vfr else 'cfr'}"


@pytest.fixture(scope="module", params=KINDS, ids=_ids)
def clip(request):
    codec, fmt, suffix, vfr = request.param
    data = make_clip(Clip(codec=codec, container=fmt, frames=61, width=162, height=98, vfr=vfr, gop=10))
    return data, suffix


def test_count_and_rate_are_decords(clip):
    data, suffix = clip
    vr = decord_reader(data, suffix)
    info = probe_video(data, LIMITS)
    assert (info.num_frames, info.fps) == (len(vr), float(vr.get_avg_fps()))
    assert (info.width, info.height) == (162, 98)


@pytest.mark.parametrize("sampling", [FrameSampling(8), FrameSampling(5, (0.3, 1.7)), FrameSampling(32)])
def test_sampled_frames_equal_decord_and_a_sequential_decode(clip, sampling):
    data, suffix = clip
    vr = decord_reader(data, suffix)
    indices = frame_indices(len(vr), float(vr.get_avg_fps()), sampling)
    got = decode_frames(data, indices, LIMITS)
    reference = vr.get_batch(indices).asnumpy()
    sequential = sequential_frames(data)
    assert len(sequential) == 61
    for k, index in enumerate(indices):
        assert got[k].dtype == np.uint8 and got[k].shape == (98, 162, 3)
        assert np.array_equal(got[k], reference[k]), (index, "decord")
        assert np.array_equal(got[k], sequential[index]), (index, "sequential")


def test_any_order_repeats_and_far_seeks_equal_a_sequential_decode():
    data = make_clip(Clip(frames=150, gop=25, width=96, height=64))
    sequential = sequential_frames(data)
    rng = np.random.default_rng(0)
    for _ in range(5):
        indices = [int(i) for i in rng.integers(0, 150, size=9)] + [149, 0, 149]
        got = decode_frames(data, indices, LIMITS)
        assert all(np.array_equal(g, sequential[i]) for g, i in zip(got, indices))


@pytest.mark.parametrize("rotation", [90, 180, -90, 45])
def test_rotation_is_applied_as_decord_applies_it(rotation):
    data = make_clip(Clip(frames=20, width=162, height=98, rotation=rotation))
    vr = decord_reader(data, ".mp4")
    got = decode_frames(data, [0, 7, 19], LIMITS)
    reference = vr.get_batch([0, 7, 19]).asnumpy()
    turned = rotation % 180 == 90
    assert got[0].shape == ((162, 98, 3) if turned else (98, 162, 3))
    assert all(np.array_equal(g, r) for g, r in zip(got, reference))


def test_matroska_rotation_is_applied_where_decords_ffmpeg_does_not_read_it():
    """A known difference: decord's bundled FFmpeg ignores Matroska's rotation; ours reads it and we
    turn the frame as decord turns MP4 frames."""
    data = make_clip(Clip(container="matroska", frames=12, width=162, height=98, rotation=90))
    got = decode_frames(data, [5], LIMITS)[0]
    unturned = decord_reader(data, ".mkv").get_batch([5]).asnumpy()[0]
    assert np.array_equal(got, np.rot90(unturned, 1))


@pytest.mark.parametrize("max_num", [1, 6])
def test_tiles_equal_the_reference_load_video(max_num):
    data = make_clip(Clip(frames=40, width=320, height=176))
    pixels, patches, indices = reference_load_video(data, ".mp4", max_num=max_num, num_segments=8)
    tiled = tile_clip(VideoClip(data, tuple(indices), TilingParams(max_num=max_num)), PreprocessConfig())
    assert tiled.num_tiles == sum(patches) and len(set(patches)) == 1
    ours = np.stack([to_tensor_normalize(t) for t in tiled.tiles])
    assert np.array_equal(ours, pixels)
    assert (max_num == 1) == (tiled.num_tiles == 8)


# -- bad videos ------------------------------------------------------------------------------------
GOOD = make_clip(Clip(frames=48, gop=48, width=96, height=64))


@pytest.mark.parametrize(
    "data, limits, reason",
    [
        (b"", LIMITS, "video_empty"),
        (png(64, 64), LIMITS, "video_format_unsupported"),
        (b"\x00" * 4096, LIMITS, "video_format_unsupported"),
        (GOOD[: len(GOOD) // 2], LIMITS, "video_corrupt"),  # the index (moov) is at the end
        (GOOD, VideoLimits(max_video_bytes=1000), "video_too_large"),
        (GOOD, VideoLimits(max_pixels=95 * 64), "video_too_large"),
        (GOOD, VideoLimits(max_frames=40), "video_too_long"),
        (long_clip(), LIMITS, "video_too_long"),
        (huge_clip(), LIMITS, "video_too_large"),
    ],
    ids=["empty", "png", "zeros", "truncated", "bytes", "pixels", "frames", "duration", "4k-plus"],
)
def test_bad_videos_are_refused_before_decoding(data, limits, reason):
    with pytest.raises(InvalidArgument) as err:
        probe_video(data, limits)
    assert err.value.reason == reason


def test_a_truncated_tail_is_refused_while_decoding():
    data = make_clip(Clip(container="matroska", frames=48, gop=48, width=96, height=64))
    cut = data[: int(len(data) * 0.6)]
    with pytest.raises(InvalidArgument) as err:
        decode_frames(cut, [47], LIMITS)
    assert err.value.reason in ("video_corrupt", "video_bound_invalid")


def test_key_frames_far_apart_exhaust_the_decode_budget():
    with pytest.raises(InvalidArgument) as err:
        decode_frames(GOOD, [40], VideoLimits(max_decoded_frames=20))
    assert err.value.reason == "video_too_costly"
    assert len(decode_frames(GOOD, [40], VideoLimits(max_decoded_frames=48))) == 1


def test_too_many_frames_or_tiles_are_refused_before_decoding():
    config = PreprocessConfig(max_tiles_per_request=8)
    with pytest.raises(InvalidArgument) as err:
        tile_clip(VideoClip(GOOD, tuple(range(9))), config)
    assert err.value.reason == "too_many_tiles"
    with pytest.raises(InvalidArgument) as err:
        tile_clip(VideoClip(GOOD, tuple(range(40)) * 2), PreprocessConfig())
    assert err.value.reason == "invalid_num_frames"
    with pytest.raises(InvalidArgument) as err:
        tile_clip(VideoClip(GOOD, (0, 48)), PreprocessConfig())
    assert err.value.reason == "video_bound_invalid"
