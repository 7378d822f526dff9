"""Frame sampling equals the reference ``get_index`` (InternVL's ``load_video``) on a table of frame
counts, frame rates, bounds and segment counts; what the reference would turn into out-of-range
indices is refused."""

import itertools

import pytest

from services.common.errors import InvalidArgument
from services.preprocess.sampling import FrameSampling, frame_indices, reference_get_index

FRAME_COUNTS = [1, 2, 7, 8, 9, 16, 31, 51, 100, 301, 1799, 216_000]
FPS = [1.0, 23.976023976023978, 24.0, 25.0, 29.97002997002997, 30.0, 59.94, 24.201680672268907]
BOUNDS = [None, (0.0, 1.0), (0.5, 3.25), (1.0, 2.0), (2.5, 1e5), (0.0, 0.04)]
SEGMENTS = [1, 4, 8, 16, 32, 64]


def _table():
    for n, fps, bound, segs in itertools.product(FRAME_COUNTS, FPS, BOUNDS, SEGMENTS):
        if bound is not None and round(bound[0] * fps) > min(round(bound[1] * fps), n - 1):
            continue  # a bound past the end: refused, tested below
        yield n, fps, bound, segs


def test_indices_equal_the_reference_formula_on_the_table():
    rows = list(_table())
    assert len(rows) > 2000
    for n, fps, bound, segs in rows:
        got = frame_indices(n, fps, FrameSampling(segs, bound))
        assert got == reference_get_index(bound, fps, n - 1, 0, segs), (n, fps, bound, segs)
        assert all(0 <= i <= n - 1 for i in got)


def test_the_formula_itself_worked_by_hand():
    # 100 frames, 8 segments: seg = 99/8 = 12.375; int(6.1875 + round(12.375 k)); 49.5 rounds to 50.
    assert frame_indices(100, 30.0, FrameSampling(8)) == [6, 18, 31, 43, 56, 68, 80, 93]
    # 51 frames: seg = 6.25; k=2 gives round(12.5) = 12 (half to even, numpy's rule), so 3.125 + 12 -> 15.
    assert frame_indices(51, 30.0, FrameSampling(8))[2] == 15
    # bound (1 s, 2 s) at 30 fps: frames 30..60, seg 7.5: int(33.75 + round(7.5 k)); 22.5 rounds to 22.
    assert frame_indices(300, 30.0, FrameSampling(4, (1.0, 2.0))) == [33, 41, 48, 55]
    # fewer frames than segments: frames repeat, as in the reference
    assert frame_indices(2, 25.0, FrameSampling(4)) == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "n, fps, sampling, reason",
    [
        (100, 30.0, FrameSampling(0), "invalid_num_frames"),
        (100, 30.0, FrameSampling(65), "invalid_num_frames"),
        (100, 30.0, FrameSampling(8, (2.0, 1.0)), "video_bound_invalid"),
        (100, 30.0, FrameSampling(8, (-1.0, 1.0)), "video_bound_invalid"),
        (100, 30.0, FrameSampling(8, (float("nan"), 1.0)), "video_bound_invalid"),
        (100, 30.0, FrameSampling(8, (10.0, 20.0)), "video_bound_invalid"),  # starts after the end
        (0, 30.0, FrameSampling(8), "video_corrupt"),
        (100, 0.0, FrameSampling(8), "video_corrupt"),
    ],
)
def test_refusals(n, fps, sampling, reason):
    with pytest.raises(InvalidArgument) as err:
        frame_indices(n, fps, sampling)
    assert err.value.reason == reason
