"""Pixel shuffle: 2x2 neighbouring patch features concatenated into one token (scale 0.5).

With ``x`` a (B, h, w, C) grid of patch features (row r, column c), output token (m, k) is the
concatenation of the features at (2m, 2k), (2m, 2k+1), (2m+1, 2k), (2m+1, 2k+1). The two versions
differ only in the order the output tokens are emitted:

- ``v2`` (InternVL 2 and later; transformers' only one): row-major, token index m * (w/2) + k;
- ``v1`` (InternVL 1.5's default): column-major, token index k * (h/2) + m. The reference skips the
  final transpose for v1, so the projector sees a transposed grid; the LLM was trained on that order.

The version is read from the checkpoint (top-level ``ps_version``), never assumed.
"""

from __future__ import annotations

import torch

from services.common.errors import InvalidArgument

PS_VERSIONS = ("v1", "v2")


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """(B, h, w, C) -> (B, h*scale * w*scale, C / scale^2) tokens, in ``version``'s order."""
    if version not in PS_VERSIONS:
        raise InvalidArgument(f"ps_version must be one of {PS_VERSIONS}, got {version!r}")
    b, h, w, c = x.shape
    factor = round(1 / scale)
    if factor < 1 or abs(1 / scale - factor) > 1e-9:
        raise InvalidArgument(f"downsample ratio must be 1/n for an integer n, got {scale}")
    if h % factor or w % factor:
        raise InvalidArgument(f"a {h}x{w} patch grid does not divide by {factor}")
    # (B, h, w, C) -> (B, h, w/f, f*C): f horizontally adjacent patches side by side.
    x = x.reshape(b, h, w // factor, factor * c)
    # (B, h, w/f, f*C) -> (B, w/f, h, f*C): columns first, so rows can be merged next.
    x = x.transpose(1, 2)
    # (B, w/f, h, f*C) -> (B, w/f, h/f, f*f*C): f vertically adjacent rows merged. Index (k, m).
    x = x.reshape(b, w // factor, h // factor, factor * factor * c)
    if version == "v2":
        x = x.transpose(1, 2)  # (B, w/f, h/f, 4C) -> (B, h/f, w/f, 4C): back to row-major (m, k)
    # (B, a, b, 4C) -> (B, a*b, 4C): tokens in the grid's memory order.
    return x.reshape(b, -1, factor * factor * c)
