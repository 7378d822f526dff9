"""Video benchmark: decoding + tiling 8 sampled frames of a 1080p H.264 clip against decoding every frame.

    python benchmarks/video_bench.py [--out benchmarks/results/video.json] [--seconds 10] [--rounds 3]

The clip is written here with PyAV (libx264, 1920x1080, 30 fps, a key frame every 2 s, a synthetic
moving pattern), so nothing is downloaded. Measured in one process, one FFmpeg thread each, best of
``rounds``, variants interleaved:

- "ours": ``tile_clip`` (probe: demux the packet table; seek to the key frame before each of the 8
  frames the reference's ``get_index`` picks and decode to it; RGB24; one 448 tile per frame);
- "probe": the probe alone (headers + packet table, no decoding): what the gateway and the encoder
  pay to plan a video, and all a cached video costs;
- "sequential": decode every frame from the start without seeking (no conversion);
- "sequential + rgb": the same, converting every frame to RGB24 (what a reader that turns the whole
  video into arrays before sampling does).

Reports seconds and the ratios sequential / ours.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def make_1080p(seconds: int, fps: int = 30) -> bytes:
    import av

    buf = io.BytesIO()
    width, height = 1920, 1080
    y, x = np.mgrid[0:height, 0:width]
    base = ((x // 8 + y // 8) % 256).astype(np.uint8)
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.codec_context.options = {"preset": "veryfast", "crf": "23", "x264-params": "scenecut=0"}
        stream.codec_context.time_base = Fraction(1, fps)
        for k in range(seconds * fps):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = base + np.uint8(k % 256)
            img[..., 1] = np.roll(base, 4 * k, axis=1)
            img[..., 2] = 255 - base
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def sequential(data: bytes, rgb: bool) -> int:
    import av

    n = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if rgb:
                frame.to_ndarray(format="rgb24")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/video.json")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from services.common.types import VideoClip
    from services.preprocess.config import PreprocessConfig, VideoLimits
    from services.preprocess.sampling import FrameSampling, frame_indices
    from services.preprocess.video import probe_video
    from services.preprocess.video_tiling import tile_clip

    data = make_1080p(args.seconds)
    info = probe_video(data, VideoLimits())
    indices = tuple(frame_indices(info.num_frames, info.fps, FrameSampling(8)))
    config = PreprocessConfig(workers=1)
    variants = {
        "ours": lambda: tile_clip(VideoClip(data, indices), config),
        "probe": lambda: probe_video(data, VideoLimits()),
        "sequential": lambda: sequential(data, rgb=False),
        "sequential + rgb": lambda: sequential(data, rgb=True),
    }
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    result = {
        "clip": {
            "codec": "h264 (libx264 veryfast, crf 23)",
            "size": "1920x1080",
            "fps": info.fps,
            "frames": info.num_frames,
            "bytes": len(data),
            "key_frame_every_s": 2,
        },
        "frame_indices": list(indices),
        "seconds_best_of": args.rounds,
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "ratio_sequential_over_ours": round(best["sequential"] / best["ours"], 2),
        "ratio_sequential_rgb_over_ours": round(best["sequential + rgb"] / best["ours"], 2),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
