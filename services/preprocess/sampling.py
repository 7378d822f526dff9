"""Which frames of a video InternVL reads: the reference ``get_index``, literally.

OpenGVLab's ``load_video`` (InternVL README and model cards) opens the file with decord
(``VideoReader(path, ctx=cpu(0), num_threads=1)``), takes ``max_frame = len(vr) - 1`` and
``fps = float(vr.get_avg_fps())``, and samples ``num_segments`` frames with::

    def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
        if bound:
            start, end = bound[0], bound[1]
        else:
            start, end = -100000, 100000
        start_idx = max(first_idx, round(start * fps))
        end_idx = min(round(end * fps), max_frame)
        seg_size = float(end_idx - start_idx) / num_segments
        frame_indices = np.array([
            int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
            for idx in range(num_segments)
        ])
        return frame_indices

``frame_indices`` below is that function: Python's ``round`` (half to even) for the bound, numpy's
``np.round`` (half to even) for the segment offsets, ``int`` truncation, float64 throughout. Index k is
the k-th frame in presentation order (decord's frame table is sorted by pts), so on a variable-frame-
rate file the bound (seconds x average fps) is approximate, exactly as in the reference.

What the reference does not do, we refuse instead of passing on: a bound whose end precedes its start
or lies outside the video (the reference would compute negative or out-of-range indices and decord
would fail), and an index outside ``0..max_frame``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.limits import MAX_FRAMES_PER_VIDEO

REASON_BOUND = "video_bound_invalid"
REASON_SEGMENTS = "invalid_num_frames"


@dataclass(frozen=True)
class FrameSampling:
    """How to sample a video: ``num_segments`` frames, optionally within ``bound`` (start, end) seconds."""

    num_segments: int = 8
    bound: tuple[float, float] | None = None

    def validate(self) -> FrameSampling:
        if not 1 <= self.num_segments <= MAX_FRAMES_PER_VIDEO:
            raise InvalidArgument(
                f"num_frames must be in 1..{MAX_FRAMES_PER_VIDEO}, got {self.num_segments}",
                reason=REASON_SEGMENTS,
            )
        if self.bound is not None:
            start, end = self.bound
            if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
                raise InvalidArgument(
                    f"the time bound must be 0 <= start < end seconds, got ({start}, {end})",
                    reason=REASON_BOUND,
                )
        return self


def reference_get_index(
    bound: tuple[float, float] | None, fps: float, max_frame: int, first_idx: int = 0, num_segments: int = 32
) -> list[int]:
    """The reference ``get_index``, unchecked (the tests compare ``frame_indices`` with it)."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


def frame_indices(num_frames: int, fps: float, sampling: FrameSampling) -> list[int]:
    """The indices ``load_video`` decodes for a video of ``num_frames`` frames at ``fps`` average
    frames per second; InvalidArgument where the reference would go out of the video."""
    sampling.validate()
    if num_frames < 1:
        raise InvalidArgument("the video has no frames", reason="video_corrupt")
    if not math.isfinite(fps) or fps <= 0:
        raise InvalidArgument(f"the video declares no usable frame rate ({fps})", reason="video_corrupt")
    max_frame = num_frames - 1
    if sampling.bound is not None:
        start_idx = max(0, round(sampling.bound[0] * fps))
        end_idx = min(round(sampling.bound[1] * fps), max_frame)
        if start_idx > end_idx:
            raise InvalidArgument(
                f"the time bound {sampling.bound} s holds no frame of a {num_frames / fps:.3f} s video",
                reason=REASON_BOUND,
            )
    indices = reference_get_index(sampling.bound, fps, max_frame, 0, sampling.num_segments)
    if min(indices) < 0 or max(indices) > max_frame:
        raise InvalidArgument(
            f"sampled frames {indices} fall outside the video's 0..{max_frame}", reason=REASON_BOUND
        )
    return indices
