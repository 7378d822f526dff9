"""Test clips written with PyAV in memory (nothing downloaded), and the oracles frames are checked against.

Every frame is different from its neighbours everywhere (a per-frame colour ramp plus a moving bar), so
an off-by-one frame or a half-decoded frame shows in every pixel comparison.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

# (codec, container format, file suffix): what the PyAV wheel can write here.
CLIP_KINDS = [
    ("libx264", "mp4", ".mp4"),
    ("libx264", "matroska", ".mkv"),
    ("mpeg4", "mp4", ".mp4"),
    ("mpeg4", "avi", ".avi"),
    ("mpeg4", "matroska", ".mkv"),
]


@dataclass(frozen=True)
class Clip:
    codec: str = "libx264"
    container: str = "mp4"
    frames: int = 48
    width: int = 160
    height: int = 96
    fps: int = 24
    gop: int = 12
    vfr: bool = False  # irregular timestamps: frame k lasts 1, 2 or 3 ticks of 1/(2*fps) s
    rotation: int | None = None  # display-matrix rotation, degrees
    bframes: bool = True


def frame_pixels(k: int, width: int, height: int) -> np.ndarray:
    """Frame ``k`` of a clip: (height, width, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 255 // max(width - 1, 1) + 37 * k) % 256
    img[..., 1] = (y * 255 // max(height - 1, 1) + 11 * k) % 256
    img[..., 2] = (97 * k) % 256
    bar = (k * 7) % width
    img[:, bar : bar + 6] = 255
    return img


def make_clip(clip: Clip = Clip()) -> bytes:
    """The encoded clip's bytes."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=clip.container) as out:
        stream = out.add_stream(clip.codec, rate=clip.fps)
        stream.width, stream.height, stream.pix_fmt = clip.width, clip.height, "yuv420p"
        stream.codec_context.gop_size = clip.gop
        if not clip.bframes:
            stream.codec_context.max_b_frames = 0
        if clip.codec == "libx264":
            stream.codec_context.options = {"preset": "veryfast", "crf": "18", "x264-params": "scenecut=0"}
        time_base = Fraction(1, 2 * clip.fps) if clip.vfr else Fraction(1, clip.fps)
        stream.codec_context.time_base = time_base
        if clip.rotation is not None:
            stream.set_display_rotation(clip.rotation)
        pts = 0
        for k in range(clip.frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(k, clip.width, clip.height), format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            pts += (1 + (k * 7) % 3) if clip.vfr else 1
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def long_clip() -> bytes:
    """Two frames an hour and a half apart: a tiny file declaring an absurd duration."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for pts in (0, 5_400_000):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def huge_clip() -> bytes:
    """One 4096x2176 frame: over the 4K UHD frame bound."""
    return make_clip(Clip(codec="mpeg4", frames=1, width=4096, height=2176))


def sequential_frames(data: bytes) -> list[np.ndarray]:
    """Every frame, decoded in order from the start without seeking: RGB24 arrays, turned upright."""
    import av

    from services.preprocess.video import upright

    with av.open(io.BytesIO(data)) as container:
        return [upright(f.to_ndarray(format="rgb24"), f.rotation) for f in container.decode(video=0)]


def decord_reader(data: bytes, suffix: str):
    """The reference's reader (``decord.VideoReader(path, ctx=cpu(0), num_threads=1)``) over ``data``
    written to a temporary file; the file is removed when the reader is (it holds it open)."""
    import decord

    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    finally:
        os.unlink(path)


def reference_load_video(
    data: bytes, suffix: str, bound=None, input_size=448, max_num=1, num_segments=8
) -> tuple[np.ndarray, list[int], list[int]]:
    """OpenGVLab's ``load_video``: decord, ``get_index``, each frame ``Image.fromarray(...).convert('RGB')``
    then ``dynamic_preprocess(use_thumbnail=True, max_num)``, ToTensor + Normalize. Returns
    ``(pixel_values (N, 3, S, S) float32, num_patches_list, frame_indices)``."""
    from PIL import Image

    from services.demo.reference import dynamic_preprocess, to_tensor_normalize
    from services.preprocess.sampling import reference_get_index

    vr = decord_reader(data, suffix)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    indices = reference_get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    pixel_values, num_patches = [], []
    for frame_index in indices:
        img = Image.fromarray(vr[frame_index].asnumpy()).convert("RGB")
        tiles = dynamic_preprocess(img, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values += [to_tensor_normalize(t) for t in tiles]
        num_patches.append(len(tiles))
    return np.stack(pixel_values), num_patches, indices
