"""The bounds of one request, each defined once.

The gateway enforces them for both public APIs (HTTP and gRPC) before any work is done, and the service
that pays for a bound checks it again with a configuration field whose default is the value here and
whose maximum is too (a service may be configured tighter, never looser than the gateway). A tenant's
own caps (``gateway.tenancy.TenantLimits``) are at most these; the single tenant gets exactly these.
README ("Limits") and docs/bad-input.md state the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import InvalidArgument

MIB = 1024 * 1024

# Images and tiles (preprocess decodes and tiles them, the encoder embeds every tile).
MAX_IMAGES_PER_REQUEST = 16
MAX_TILES_PER_REQUEST = 128  # thumbnails included; each tile is 256 image tokens
MAX_TILES_PER_IMAGE = 40  # InternVL 1.5 allows up to 40 dynamic tiles (``max_num``), thumbnail aside
MAX_IMAGE_BYTES = 20 * MIB  # an encoded image; 20 MiB covers a 50-megapixel camera JPEG
MAX_IMAGE_PIXELS = 50_000_000  # width x height, checked from the header before decoding

# Videos (preprocess probes and decodes them; each sampled frame is tiled like an image). A video is one
# entry of the MAX_IMAGES_PER_REQUEST count; its frames' tiles count against MAX_TILES_PER_REQUEST.
MAX_VIDEO_BYTES = 64 * MIB  # an encoded video (a data URI of it is ~85 MiB, under the HTTP body bound)
MAX_VIDEO_DURATION_S = 3600.0  # container or stream duration
MAX_VIDEO_PIXELS = 3840 * 2160  # width x height of a frame (4K), from the codec parameters and every frame
MAX_VIDEO_FRAMES = 216_000  # frames (packets) of the video stream: an hour at 60 fps
MAX_VIDEO_DECODED_FRAMES = 4096  # frames decoded to reach the sampled ones (the work bound of one video)
MAX_FRAMES_PER_VIDEO = 64  # sampled frames (InternVL's num_segments); the reference's default is 32
MAX_FRAMES_PER_REQUEST = MAX_TILES_PER_REQUEST  # every frame is at least one tile
DEFAULT_FRAMES_PER_VIDEO = 8  # InternVL's model cards sample 8 segments

# Text and generation (the decoder tokenises and generates).
MAX_MESSAGES = 256
MAX_TEXT_BYTES = 1 * MIB  # UTF-8 bytes of all text parts of a request
MAX_TOP_LOGPROBS = 20
MAX_TOKENS_PER_REQUEST = 1_000_000  # the cap of max_tokens; the model's context bounds it further
MAX_N = 16  # choices (``n``) of one request: each is a sequence in the decoder's batch, with its own KV

# Structured outputs (``response_format``) and ``logit_bias`` (the decoder compiles and applies them).
MAX_SCHEMA_BYTES = 256 * 1024  # a JSON schema, as canonical JSON (UTF-8)
MAX_GRAMMAR_COMPILE_MS = 10_000  # wall time to compile one schema, queueing in the compile pool included
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's bound
MAX_ABS_LOGIT_BIAS = 100.0  # a bias lies in -100..100, as OpenAI's

# Scheduling: a tenant's priority (higher runs first) lies in -MAX_PRIORITY..MAX_PRIORITY.
MAX_PRIORITY = 10
# Fair share: a tenant's weight (its share of the decoder within its priority class) lies in
# MIN_WEIGHT..MAX_WEIGHT; its max_kv_share (fraction of the KV blocks) in (0, 1].
MIN_WEIGHT = 0.01
MAX_WEIGHT = 100.0


def check_image_tiles(tiles: Sequence[int], frames: Sequence[int] | None = None) -> None:
    """InvalidArgument unless ``tiles`` (one count per image or video) is at most
    ``MAX_IMAGES_PER_REQUEST`` entries, each image 1..``MAX_TILES_PER_IMAGE`` tiles (+ a thumbnail) and
    each video of ``frames[k]`` (1..``MAX_FRAMES_PER_VIDEO``) frames that many per frame,
    ``MAX_TILES_PER_REQUEST`` in all: what the encoder and the decoder check again themselves, whoever
    asks. ``frames`` None: every entry is an image (one frame)."""
    frames = [1] * len(tiles) if frames is None else list(frames)
    if len(tiles) > MAX_IMAGES_PER_REQUEST:
        raise InvalidArgument(
            f"{len(tiles)} images, over the limit of {MAX_IMAGES_PER_REQUEST} per request",
            reason="too_many_images",
        )
    if len(frames) != len(tiles):
        raise InvalidArgument(f"{len(tiles)} images but {len(frames)} frame counts")
    for k, (n, f) in enumerate(zip(tiles, frames)):
        if not 1 <= f <= MAX_FRAMES_PER_VIDEO:
            raise InvalidArgument(
                f"video {k}: {f} frames, outside 1..{MAX_FRAMES_PER_VIDEO}", reason="invalid_num_frames"
            )
        if not f <= n <= f * (MAX_TILES_PER_IMAGE + 1) or n % f:
            raise InvalidArgument(
                f"image {k}: {n} tiles for {f} frame(s), outside 1..{MAX_TILES_PER_IMAGE + 1} per frame",
                reason="too_many_tiles",
            )
    if sum(tiles) > MAX_TILES_PER_REQUEST:
        raise InvalidArgument(
            f"{sum(tiles)} tiles, over the limit of {MAX_TILES_PER_REQUEST} per request",
            reason="too_many_tiles",
        )


def check_n(n: int, cap: int = MAX_N) -> None:
    """InvalidArgument (``n_out_of_range``) unless ``n`` choices lie in 1..``cap`` (a tenant's ``max_n``,
    at most ``MAX_N``): what the gateway checks for a tenant and the decoder again, whoever asks."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cap:
        raise InvalidArgument(f"n must be in 1..{cap}, got {n!r}", reason="n_out_of_range")
