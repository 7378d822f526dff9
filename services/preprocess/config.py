"""Validated configuration of the preprocess service.

Built once at the entry point (CLI flags, a Serve config, a Helm value) and passed down; library code
reads no environment variables. Every field is bounded so a typo fails at start-up, not under load.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.config import CommonConfig, StrictModel
from services.common.limits import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES_PER_REQUEST,
    MAX_TILES_PER_IMAGE,
    MAX_TILES_PER_REQUEST,
    MAX_VIDEO_BYTES,
    MAX_VIDEO_DECODED_FRAMES,
    MAX_VIDEO_DURATION_S,
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_PIXELS,
)

# Pillow's own decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS`` by default): Pillow warns
# above it and refuses above twice it, inside ``Image.open``. Keeping our limit at or below it means
# our header check is what decides for every image Pillow lets through, and anything Pillow refuses on
# its own is over our limit anyway, so both paths give the same answer.
PILLOW_BOMB_PIXELS = 89_478_485


def _default_workers() -> int:
    return os.cpu_count() or 1


class DecodeLimits(BaseModel):
    """Hard bounds applied to one encoded image before and during decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_image_bytes: int = Field(
        default=MAX_IMAGE_BYTES,
        ge=1,
        le=MAX_IMAGE_BYTES,
        description=(
            "Largest encoded image accepted, in bytes (20 MiB, the mesh's bound, which the gateway "
            "enforces; a lower value only tightens it). Checked before anything is parsed."
        ),
    )
    max_pixels: int = Field(
        default=MAX_IMAGE_PIXELS,
        ge=1,
        le=min(MAX_IMAGE_PIXELS, PILLOW_BOMB_PIXELS),
        description=(
            "Largest decoded image accepted, width x height. Checked from the header, before the pixels "
            "are decoded, so a small file declaring a huge canvas costs nothing. 50 M pixels (the mesh's "
            "bound; a lower value only tightens it) is ~150 MB of RGB."
        ),
    )


class VideoLimits(BaseModel):
    """Hard bounds applied to one encoded video while it is probed and decoded (``video.py``).

    Each default is the mesh's bound (``services.common.limits``) and its maximum: a lower value only
    tightens it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_video_bytes: int = Field(
        default=MAX_VIDEO_BYTES,
        ge=1,
        le=MAX_VIDEO_BYTES,
        description="Largest encoded video, in bytes (64 MiB). Checked before anything is parsed.",
    )
    max_pixels: int = Field(
        default=MAX_VIDEO_PIXELS,
        ge=1,
        le=MAX_VIDEO_PIXELS,
        description=(
            "Largest frame, width x height (4K UHD). Checked from the codec parameters before any "
            "packet is read, and again on every decoded frame."
        ),
    )
    max_duration_s: float = Field(
        default=MAX_VIDEO_DURATION_S,
        gt=0,
        le=MAX_VIDEO_DURATION_S,
        description="Longest video, in seconds (an hour), from the headers and from the packets' timestamps.",
    )
    max_frames: int = Field(
        default=MAX_VIDEO_FRAMES,
        ge=1,
        le=MAX_VIDEO_FRAMES,
        description="Most frames in the video stream (an hour at 60 fps); the packet loop stops there.",
    )
    max_decoded_frames: int = Field(
        default=MAX_VIDEO_DECODED_FRAMES,
        ge=1,
        le=MAX_VIDEO_DECODED_FRAMES,
        description=(
            "Most frames decoded to reach one video's sampled frames (seeks start at key frames, so "
            "this bounds the work a file with key frames far apart can cause)."
        ),
    )


class PreprocessConfig(BaseModel):
    """Everything the preprocess pool needs: decode limits, per-request caps and pool size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: DecodeLimits = Field(default_factory=DecodeLimits, description="Bounds on each image.")
    video: VideoLimits = Field(default_factory=VideoLimits, description="Bounds on each video.")
    max_images_per_request: int = Field(
        default=MAX_IMAGES_PER_REQUEST,
        ge=1,
        le=MAX_IMAGES_PER_REQUEST,
        description=(
            "Most images one request may carry (16, the mesh's bound; a lower value only tightens it); "
            "more is INVALID_ARGUMENT (reason too_many_images)."
        ),
    )
    max_tiles_per_request: int = Field(
        default=MAX_TILES_PER_REQUEST,
        ge=1,
        le=MAX_TILES_PER_REQUEST,
        description=(
            "Most tiles (thumbnails included) one request may produce, summed over its images (128, the "
            "mesh's bound; a lower value only tightens it); each tile "
            "is 256 image tokens and 0.6 MB of uint8 pixels. More is INVALID_ARGUMENT (reason too_many_tiles), "
            "decided from the image headers before any pixel is decoded."
        ),
    )
    workers: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=512,
        description="Threads decoding and resizing in parallel; defaults to the number of CPUs.",
    )


class PreprocessAppArgs(StrictModel):
    """The args of the preprocess Serve application (``services.preprocess.deployment:build_app``)."""

    config: PreprocessConfig = Field(default_factory=PreprocessConfig)
    default_max_num: int = Field(
        default=12, ge=1, le=MAX_TILES_PER_IMAGE, description="max_num of a gRPC request that sets none."
    )
    common: CommonConfig = Field(default_factory=CommonConfig)
    deployment_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options over the CPU pool's defaults."
    )
