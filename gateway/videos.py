"""Video intake: data URIs and raw bytes in, bounded; frames planned before any decoding.

Both public APIs turn a video content part into a ``VideoPart``; ``Gateway.chat`` plans it with
``plan_video`` (the headers and packet table are read, nothing is decoded): the frames the reference's
``get_index`` picks, the tiles they take (one per frame unless ``max_num`` says more), the tenant's cap
of frames. A remote video (where remote fetching is enabled, with the same allow-list rules as images)
counts its most until it is fetched after admission (``resolve_remote_video``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.images import checked_media, decode_media_data_uri
from gateway.types import VideoPart
from services.common.errors import InvalidArgument
from services.common.limits import DEFAULT_FRAMES_PER_VIDEO, MAX_TILES_PER_IMAGE, MAX_VIDEO_BYTES
from services.common.types import TilingParams, VideoClip
from services.preprocess.config import VideoLimits
from services.preprocess.sampling import FrameSampling, frame_indices
from services.preprocess.video import probe_video
from services.preprocess.video_tiling import frame_tiles_bound

_DATA_URI = re.compile(
    r"^data:(?P<mime>(video|application)/[A-Za-z0-9.+-]+)?(?P<params>(;[A-Za-z0-9=.+-]+)*);base64,", re.ASCII
)
_LIMITS = VideoLimits()


def checked_video(data: bytes) -> bytes:
    return checked_media(data, "video", MAX_VIDEO_BYTES)


def decode_video_data_uri(url: str) -> bytes:
    """The bytes of a base64 ``data:video/...`` URI; InvalidArgument with a reason for anything else."""
    return decode_media_data_uri(url, "video", MAX_VIDEO_BYTES, _DATA_URI, "mp4")


def video_part(
    data: bytes,
    url: str | None,
    num_frames: int | None,
    bound: tuple[float, float] | None,
    max_num: int | None,
) -> VideoPart:
    """A ``VideoPart`` with its sampling checked (both APIs call this)."""
    FrameSampling(DEFAULT_FRAMES_PER_VIDEO if num_frames is None else num_frames, bound).validate()
    if max_num is not None and not 1 <= max_num <= MAX_TILES_PER_IMAGE:
        raise InvalidArgument(
            f"video max_num must be in 1..{MAX_TILES_PER_IMAGE}, got {max_num}", reason="invalid_max_num"
        )
    return VideoPart(data, num_frames, bound, max_num, url)


@dataclass
class VideoPlan:
    """How one video of a request is embedded: its sampling, the tiling of each frame, and (once the
    bytes are known) the frames the reference picks."""

    sampling: FrameSampling
    tiling: TilingParams
    indices: tuple[int, ...] = ()

    @property
    def frames(self) -> int:
        return self.sampling.num_segments

    def clip(self, data: bytes) -> VideoClip:
        return VideoClip(data, self.indices, self.tiling)


def plan_video(k: int, part: VideoPart, model_max_tiles: int) -> tuple[VideoPlan, int]:
    """The plan of video ``k`` and the tiles it takes (its most, for a remote video not fetched yet)."""
    sampling = FrameSampling(part.num_frames or DEFAULT_FRAMES_PER_VIDEO, part.bound).validate()
    tiling = TilingParams(max_num=min(part.max_num or 1, model_max_tiles)).validate()
    plan = VideoPlan(sampling, tiling)
    if part.url:
        per_frame = 1 if tiling.max_num == 1 else tiling.max_num + 1
        return plan, plan.frames * per_frame
    return plan, resolve_video(k, plan, part.data)


def resolve_video(k: int, plan: VideoPlan, data: bytes) -> int:
    """Probe the video (no decoding), fix the plan's frames; the tiles they take."""
    try:
        info = probe_video(data, _LIMITS)
        plan.indices = tuple(frame_indices(info.num_frames, info.fps, plan.sampling))
    except InvalidArgument as exc:
        raise InvalidArgument(f"video (part {k}): {exc.message}", reason=exc.reason) from None
    return plan.frames * frame_tiles_bound(info, plan.tiling)


def visual_item(part, plan):
    """What the encoder is sent for one image or video part: ``(bytes, tiling)`` or a ``VideoClip``."""
    if isinstance(plan, VideoPlan):
        return plan.clip(part.data)
    return (part.data, plan)
