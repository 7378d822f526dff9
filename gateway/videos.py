"""Video intake: data URIs and raw bytes in, bounded; frames planned before any decoding.

Both public APIs turn a video content part into a ``VideoPart``; ``Gateway.chat`` plans it with
``plan_video`` (the headers and packet table are read, nothing is decoded): the frames the reference's
``get_index`` picks, the tiles they take (one per frame unless ``max_num`` says more), the tenant's cap
of frames. A remote video (where remote fetching is enabled, with the same allow-list rules as images)
counts its most until it is fetched after admission (``resolve_remote_video``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

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
    """``data`` if it holds between 1 byte and the video-size bound; InvalidArgument otherwise."""
    if not data:
        raise InvalidArgument("video holds no bytes", reason="video_empty")
    if len(data) > MAX_VIDEO_BYTES:
        raise InvalidArgument(
            f"video is larger than the {MAX_VIDEO_BYTES}-byte limit", reason="video_too_large"
        )
    return data


def decode_video_data_uri(url: str) -> bytes:
    """The bytes of a base64 ``data:video/...`` URI; InvalidArgument with a reason for anything else."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument("video_url.url must be a non-empty string", reason="video_url_invalid")
    if url.startswith(("http://", "https://")):
        raise InvalidArgument(
            "remote video URLs are not fetched by this server; send the video as a data URI "
            "(data:video/mp4;base64,...)",
            reason="remote_images_disabled",
        )
    match = _DATA_URI.match(url)
    if match is None:
        raise InvalidArgument(
            "video_url.url must be a base64 data URI: data:video/<type>;base64,<data>",
            reason="video_url_invalid",
        )
    payload = url[match.end() :]
    if len(payload) > (MAX_VIDEO_BYTES * 4) // 3 + 4:
        raise InvalidArgument(
            f"video is larger than the {MAX_VIDEO_BYTES}-byte limit", reason="video_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(
            f"video data URI is not valid base64: {exc}", reason="video_url_invalid"
        ) from None
    return checked_video(data)


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
