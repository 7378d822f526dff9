"""Video probing and frame decoding with hard limits, frame-identical with the reference's decord reader.

The reference (``load_video``) reads a video through decord: ``VideoReader`` demuxes every packet of the
video stream to build a frame table sorted by presentation timestamp, ``len(vr)`` is the stream's
``nb_frames`` (else average fps x duration, an estimate of the packet count: we count the packets), ``get_avg_fps()`` is the stream's ``avg_frame_rate``, and
frame k is the k-th entry of the table, decoded after an accurate seek and converted to RGB24 by
swscale, then turned upright by the display matrix (decord applies a rotation of 90, 180 or 270
degrees; measured on generated clips: a 90-degree matrix gives the frame turned counter-clockwise). We do the same with PyAV (FFmpeg's libraries): the same
packet table, the same count and rate, ``to_ndarray(format="rgb24")`` for the conversion, and frames
matched by timestamp after seeking, so a frame is the same pixels whether it was reached by a seek or
by decoding everything before it (the tests check both against decord and a sequential decode).

Guard rails, each checked as early as it can be (``VideoLimits``):

1. empty input and the byte limit, before anything is parsed; the container from its magic bytes;
2. the container and codec against short allow-lists, the frame size from the codec parameters and
   the duration from the headers, before any packet is read;
3. the frame count while demuxing (the packet loop stops at the limit), and the duration the packets
   span;
4. decoding: a budget of decoded frames per video (a long GOP cannot make eight samples cost a whole
   film), every decoded frame's size checked again before conversion (a stream may change size),
   truncated or corrupt data refused.

Every failure is an ``InvalidArgument`` with one of the reasons below; no PyAV exception escapes.
Decoding uses one FFmpeg thread: the preprocess pool's threads are the parallelism.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.preprocess.config import VideoLimits

REASON_EMPTY = "video_empty"
REASON_TOO_LARGE = "video_too_large"
REASON_TOO_LONG = "video_too_long"
REASON_UNSUPPORTED = "video_format_unsupported"
REASON_CORRUPT = "video_corrupt"
REASON_TOO_COSTLY = "video_too_costly"

# FFmpeg demuxer names (``container.format.name``) and decoder names we accept.
ALLOWED_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "mpeg")
ALLOWED_CODECS = ("h264", "hevc", "mpeg4", "vp8", "vp9", "av1", "mjpeg", "mpeg1video", "mpeg2video")
_AV_TIME_BASE = 1_000_000


def sniff_container(data: bytes) -> str | None:
    """The container the magic bytes announce, or None: tells "not a video we take" (unsupported)
    from "one of ours, but broken" (corrupt), before FFmpeg probes anything."""
    if data[4:8] == b"ftyp" or data[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "MP4/MOV"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "AVI"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:
        return "MPEG-TS"
    if data[:4] == b"\x00\x00\x01\xba":
        return "MPEG-PS"
    return None


@dataclass(frozen=True)
class VideoInfo:
    """What the headers and the packet table say; nothing decoded. ``num_frames`` and ``fps`` are
    decord's ``len(vr)`` and ``get_avg_fps()``."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float
    codec: str
    container: str


@dataclass(frozen=True)
class _Table:
    """The video stream's packets: presentation timestamps sorted (frame k is ``pts[k]``), and the
    sorted timestamps of its key frames."""

    pts: list[int]
    key_pts: list[int]


def probe_video(data: bytes, limits: VideoLimits) -> VideoInfo:
    """Headers and the packet table of ``data``, every bound that needs no decoding checked."""
    with _opened(data, limits) as (_, info, _table):
        return info


def decode_frames(data: bytes, indices: list[int], limits: VideoLimits) -> list[np.ndarray]:
    """The RGB24 frames (H, W, 3) uint8 at ``indices`` (decord's frame numbers), in the given order."""
    with _opened(data, limits) as (container, info, table):
        if not indices or min(indices) < 0 or max(indices) >= info.num_frames:
            raise InvalidArgument(
                f"frame indices must lie in 0..{info.num_frames - 1}", reason="video_bound_invalid"
            )
        wanted = {table.pts[i] for i in indices}
        frames = _decode_pts(container, table, sorted(wanted), limits)
        return [frames[table.pts[i]] for i in indices]


@contextmanager
def _opened(data: bytes, limits: VideoLimits) -> Iterator[tuple[object, VideoInfo, _Table]]:
    """The open container (seeked back to its start), its ``VideoInfo`` and packet table."""
    import av

    if not data:
        raise InvalidArgument("video is empty (0 bytes)", reason=REASON_EMPTY)
    if len(data) > limits.max_video_bytes:
        raise InvalidArgument(
            f"video is {len(data)} bytes, over the limit of {limits.max_video_bytes} bytes",
            reason=REASON_TOO_LARGE,
        )
    kind = sniff_container(data)
    if kind is None:
        raise InvalidArgument(
            "not a supported video (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS)", reason=REASON_UNSUPPORTED
        )
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InvalidArgument(f"{kind} data cannot be read: {exc}", reason=REASON_CORRUPT) from None
    try:
        stream = _video_stream(container)
        _check_headers(container, stream, limits)
        table = _packet_table(container, stream, limits)
        info = _info(container, stream, table, limits)
        yield container, info, table
    except av.FFmpegError as exc:
        raise InvalidArgument(f"video data cannot be read: {exc}", reason=REASON_CORRUPT) from None
    finally:
        container.close()


def _video_stream(container):
    fmt = container.format.name
    if fmt not in ALLOWED_CONTAINERS:
        raise InvalidArgument(
            f"video container {fmt!r} is not supported (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS)",
            reason=REASON_UNSUPPORTED,
        )
    if not container.streams.video:
        raise InvalidArgument("the file has no video stream", reason=REASON_UNSUPPORTED)
    stream = container.streams.video[0]
    name = stream.codec_context.name if stream.codec_context is not None else None
    if name not in ALLOWED_CODECS:
        raise InvalidArgument(
            f"video codec {name!r} is not supported ({', '.join(ALLOWED_CODECS)})", reason=REASON_UNSUPPORTED
        )
    stream.codec_context.thread_count = 1
    return stream


def _check_headers(container, stream, limits: VideoLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise InvalidArgument(f"video declares an empty frame {width}x{height}", reason=REASON_CORRUPT)
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"video frames are {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels}",
            reason=REASON_TOO_LARGE,
        )
    durations = [container.duration / _AV_TIME_BASE if container.duration else 0.0]
    if stream.duration and stream.time_base:
        durations.append(float(stream.duration * stream.time_base))
    _check_duration(max(durations), limits)
    if stream.frames > limits.max_frames:
        raise InvalidArgument(
            f"video declares {stream.frames} frames, over the limit of {limits.max_frames}",
            reason=REASON_TOO_LONG,
        )


def _check_duration(seconds: float, limits: VideoLimits) -> None:
    if seconds > limits.max_duration_s:
        raise InvalidArgument(
            f"video lasts {seconds:.1f} s, over the limit of {limits.max_duration_s:.0f} s",
            reason=REASON_TOO_LONG,
        )


def _packet_table(container, stream, limits: VideoLimits) -> _Table:
    """Demux (no decoding) every packet of ``stream``, as decord's ``IndexKeyframes`` does."""
    pts, keys = [], []
    read = 0
    for packet in container.demux(stream):
        read += 1
        if read > 4 * limits.max_frames:
            raise InvalidArgument("video has too many packets", reason=REASON_TOO_LONG)
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None or packet.size == 0:
            continue  # the demuxer's flush packet, or a packet without any time
        pts.append(stamp)
        if packet.is_keyframe:
            keys.append(stamp)
        if len(pts) > limits.max_frames:
            raise InvalidArgument(f"video has more than {limits.max_frames} frames", reason=REASON_TOO_LONG)
    if not pts:
        raise InvalidArgument("video has no frames", reason=REASON_CORRUPT)
    pts.sort()
    if stream.time_base:
        _check_duration(float((pts[-1] - pts[0]) * stream.time_base), limits)
    container.seek(0, stream=stream, backward=True)
    return _Table(pts, sorted(keys) or [pts[0]])


def _info(container, stream, table: _Table, limits: VideoLimits) -> VideoInfo:
    rate = stream.average_rate
    fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise InvalidArgument("video declares no average frame rate", reason=REASON_CORRUPT)
    # decord: the header's nb_frames, else avg_frame_rate x container duration (truncated), an estimate of
    # the packet count that depends on how the FFmpeg version computes the duration (a generated VFR
    # Matroska clip of 60 frames: 60 with decord's FFmpeg, 59 with ours). We count the packets there.
    # decord fails reading past its packet table: frames beyond it do not exist.
    count = stream.frames if stream.frames > 0 else len(table.pts)
    count = min(count, len(table.pts))
    duration = (container.duration or 0) / _AV_TIME_BASE
    return VideoInfo(
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        num_frames=count,
        fps=fps,
        duration_s=duration,
        codec=stream.codec_context.name,
        container=container.format.name,
    )


def _decode_pts(container, table: _Table, targets: list[int], limits: VideoLimits) -> dict[int, np.ndarray]:
    """RGB24 frames with the presentation timestamps ``targets`` (ascending).

    Decodes forward from where the decoder is while the next target's key frame is behind it; seeks
    to the key frame at or before a target otherwise. A seek that lands after its target (an index
    that lies) falls back to decoding from the start.
    """
    stream = container.streams.video[0]
    budget = _Budget(limits.max_decoded_frames)
    out: dict[int, np.ndarray] = {}
    frames = None  # the decoding iterator
    position = None  # pts of the last frame decoded
    for target in targets:
        if target in out:
            continue
        key = table.key_pts[max(0, bisect.bisect_right(table.key_pts, target) - 1)]
        if frames is None or position is None or position >= target or key > position:
            frames, position = _seek(container, stream, key), None
        position = _decode_until(frames, target, set(targets), out, budget, limits)
        if target not in out and position is not None and position > target:
            frames, position = _seek(container, stream, table.pts[0]), None  # the seek overshot
            position = _decode_until(frames, target, set(targets), out, budget, limits)
        if target not in out:
            raise InvalidArgument(f"video frame at pts {target} cannot be decoded", reason=REASON_CORRUPT)
    return out


def _seek(container, stream, pts: int):
    container.seek(pts, stream=stream, backward=True, any_frame=False)
    return container.decode(stream)


class _Budget:
    def __init__(self, frames: int):
        self.left = frames

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise InvalidArgument(
                "reaching the sampled frames needs more decoding than allowed (key frames too far apart)",
                reason=REASON_TOO_COSTLY,
            )


def upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """The frame as decord returns it: turned by the display matrix's rotation (counter-clockwise
    degrees, as FFmpeg reports it) when that is within a degree of a multiple of 90; other angles
    are left alone, as decord leaves them."""
    quarter = round((rotation or 0) / 90)
    if abs((rotation or 0) - 90 * quarter) >= 1 or quarter % 4 == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, quarter % 4))


def _decode_until(frames, target: int, wanted: set[int], out: dict, budget: _Budget, limits) -> int | None:
    """Decode until the frame at ``target`` (or past it); keeps every wanted frame met on the way."""
    position = None
    for frame in frames:
        budget.spend()
        stamp = frame.pts if frame.pts is not None else frame.dts
        if frame.width * frame.height > limits.max_pixels:
            raise InvalidArgument(
                f"a video frame is {frame.width}x{frame.height}, over the limit of {limits.max_pixels} pixels",
                reason=REASON_TOO_LARGE,
            )
        if stamp is None:
            continue
        position = stamp
        if stamp in wanted and stamp not in out:
            out[stamp] = upright(frame.to_ndarray(format="rgb24"), frame.rotation)
        if stamp >= target:
            break
    return position
