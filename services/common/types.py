"""Plain domain objects that cross service boundaries (no torch, no gRPC)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.limits import MAX_TILES_PER_IMAGE

__all__ = [
    "MAX_TILES_PER_IMAGE",
    "TILE_SIZE",
    "TOKENS_PER_TILE",
    "TiledImage",
    "TilingParams",
    "VideoClip",
    "sha256_hex",
]

TILE_SIZE = 448
# Image tokens per 448-pixel tile in the InternVL family: (448 / 14)^2 patches, a quarter kept by the
# 0.5 pixel shuffle. A checkpoint says its own (``image_seq_length``); this is the family default.
TOKENS_PER_TILE = 256


@dataclass(frozen=True)
class TilingParams:
    """How one image is cut into tiles (INTERNVL.md, "Dynamic tiling")."""

    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    tile_size: int = TILE_SIZE

    def validate(self) -> TilingParams:
        if not 1 <= self.min_num <= MAX_TILES_PER_IMAGE:
            raise InvalidArgument(f"min_num must be in 1..{MAX_TILES_PER_IMAGE}, got {self.min_num}")
        if not 1 <= self.max_num <= MAX_TILES_PER_IMAGE:
            raise InvalidArgument(f"max_num must be in 1..{MAX_TILES_PER_IMAGE}, got {self.max_num}")
        if self.min_num > self.max_num:
            raise InvalidArgument(f"min_num ({self.min_num}) must not exceed max_num ({self.max_num})")
        if not 14 <= self.tile_size <= 1792:
            raise InvalidArgument(f"tile_size must be in 14..1792, got {self.tile_size}")
        return self

    def cache_token(self) -> str:
        """A stable string naming these parameters inside cache keys."""
        return f"t{self.tile_size}-min{self.min_num}-max{self.max_num}-th{int(self.use_thumbnail)}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class TiledImage:
    """One image cut into tiles: what preprocess hands to the vision encoder.

    ``tiles`` is uint8 (N, S, S, 3), row-major grid tiles first, then the thumbnail (if any).
    ``width``/``height`` are the original image's; ``sha256`` is of the original encoded bytes when
    they are known (it names the image in cache keys).
    """

    tiles: np.ndarray
    grid: tuple[int, int]
    width: int
    height: int
    sha256: str | None = None

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def has_thumbnail(self) -> bool:
        return self.num_tiles > self.grid[0] * self.grid[1]

    def num_image_tokens(self, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
        """Number of ``<IMG_CONTEXT>`` tokens this image takes in the prompt."""
        return self.num_tiles * tokens_per_tile


def video_frames_sha256(video_sha256: str, frame_indices: tuple[int, ...]) -> str:
    """The content address of some frames of a video: its bytes' SHA-256 and the frame numbers (the
    tiling parameters join it in the cache key, as for an image)."""
    listed = ",".join(str(i) for i in frame_indices)
    return sha256_hex(f"internvl-video-frames:v1:{video_sha256}:{listed}".encode())


@dataclass(frozen=True, eq=False)
class VideoClip:
    """Frames of one encoded video to tile: ``frame_indices`` (decord's frame numbers, as the reference's
    ``get_index`` picks them), each frame tiled with ``tiling`` (the reference: one tile, ``max_num`` 1).
    Embedded as one entry of ``len(frame_indices)`` frames, its tiles frame by frame."""

    data: bytes
    frame_indices: tuple[int, ...]
    tiling: TilingParams = TilingParams(max_num=1)

    @property
    def frames(self) -> int:
        return len(self.frame_indices)

    def content_sha256(self) -> str:
        return video_frames_sha256(sha256_hex(self.data), self.frame_indices)
