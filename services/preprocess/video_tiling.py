"""A video's sampled frames in, uint8 tiles out: what the reference's ``load_video`` does per frame.

The reference turns each decoded frame into ``Image.fromarray(frame).convert('RGB')`` and tiles it with
``dynamic_preprocess(img, image_size=448, use_thumbnail=True, max_num=max_num)``; the model cards call it
with ``max_num=1``, so each frame is the whole frame resized to one 448 tile (a 1x1 grid takes no
thumbnail). We tile each frame with the same bit-exact code as images (``tiling.py``); the frames' tiles
are concatenated in frame order, so a clip is one ``TiledImage`` of ``frames x tiles per frame`` tiles.

Every frame of a video has the same size, so every frame takes the same number of tiles; before any
decoding that number is bounded from the codec parameters (the larger of the two orientations, since
the display rotation is known only once a frame is decoded).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.limits import MAX_FRAMES_PER_VIDEO
from services.common.types import TiledImage, TilingParams, VideoClip
from services.preprocess.config import PreprocessConfig, VideoLimits
from services.preprocess.tiling import count_tiles, tile_image
from services.preprocess.video import VideoInfo, decode_frames, probe_video


def frame_tiles_bound(info: VideoInfo, params: TilingParams) -> int:
    """Tiles one frame of the video takes at most (either orientation)."""
    return max(count_tiles(info.width, info.height, params), count_tiles(info.height, info.width, params))


def check_clip(clip: VideoClip, limits: VideoLimits) -> tuple[VideoInfo, int]:
    """Probe the clip's video (no decoding) and bound its tiles: ``(info, most tiles)``."""
    if not 1 <= clip.frames <= MAX_FRAMES_PER_VIDEO:
        raise InvalidArgument(
            f"a video asks for {clip.frames} frames; 1..{MAX_FRAMES_PER_VIDEO} are accepted",
            reason="invalid_num_frames",
        )
    params = clip.tiling.validate()
    info = probe_video(clip.data, limits)
    if min(clip.frame_indices) < 0 or max(clip.frame_indices) >= info.num_frames:
        raise InvalidArgument(
            f"frame indices must lie in 0..{info.num_frames - 1}", reason="video_bound_invalid"
        )
    return info, clip.frames * frame_tiles_bound(info, params)


def tile_clip(clip: VideoClip, config: PreprocessConfig) -> TiledImage:
    """Decode the clip's frames and tile each like the reference; the tiles frame by frame."""
    _, most = check_clip(clip, config.video)
    if most > config.max_tiles_per_request:
        raise InvalidArgument(
            f"the video's frames would take up to {most} tiles, over the limit of "
            f"{config.max_tiles_per_request}; lower max_num or ask for fewer frames",
            reason="too_many_tiles",
        )
    frames = decode_frames(clip.data, list(clip.frame_indices), config.video)
    tiled = [tile_image(Image.fromarray(rgb, "RGB"), clip.tiling) for rgb in frames]
    first = tiled[0]
    return TiledImage(
        tiles=np.concatenate([t.tiles for t in tiled]),  # (frames * tiles per frame, S, S, 3)
        grid=first.grid,
        width=first.width,
        height=first.height,
        sha256=clip.content_sha256(),
    )
