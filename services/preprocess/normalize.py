"""Tile normalisation for the vision encoder, equal to torchvision ``ToTensor()`` + ``Normalize``.

Preprocess ships uint8 tiles (4x fewer bytes than float32); the encoder moves them to its device and
normalises there. The reference computes, per channel c and pixel value v (float32 throughout)::

    t = float(v) / 255              # ToTensor: img.float().div(255)
    out = (t - mean[c]) / std[c]    # Normalize: tensor.sub_(mean).div_(std), float32 tensors

On the CPU we run exactly those operations (one uint8 -> float32 copy, then three in-place passes):
they are the reference's own, so the result is the reference's. On any other device we do not trust
the arithmetic to round the same way (CUDA, for one, turns division by a scalar into multiplication
by its reciprocal). A uint8 pixel has only 256 values, so there the result comes from a 3 x 256 table
computed once on the CPU with the reference's operations and gathered on the device: exact by
construction.
"""

from __future__ import annotations

import threading

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_tables: dict[torch.device, torch.Tensor] = {}
_tables_lock = threading.Lock()


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize's float32 mean and std, shaped (1, 3, 1, 1) to broadcast over (N, 3, S, S)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def _reference_table() -> torch.Tensor:
    """(3 * 256,) float32: entry c * 256 + v is the normalised value of pixel value v in channel c."""
    values = torch.arange(256, dtype=torch.uint8).float().div(255)  # (256,), as ToTensor
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1)
    return values.view(1, 256).sub(mean).div(std).reshape(3 * 256)  # (3, 256) -> (768,)


def _table_on(device: torch.device) -> torch.Tensor:
    table = _tables.get(device)
    if table is None:
        with _tables_lock:
            table = _tables.get(device)
            if table is None:
                table = _reference_table().to(device)
                _tables[device] = table
    return table


def normalize_tiles(tiles_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, S, S, 3) uint8 tiles -> (N, 3, S, S) normalised tiles in ``dtype``, on the input's device.

    Equal, bit for bit, to stacking ``Normalize(IMAGENET_MEAN, IMAGENET_STD)(ToTensor()(tile))`` over
    the tiles and casting the float32 result to ``dtype``.
    """
    if tiles_uint8.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8, got {tiles_uint8.dtype}")
    if tiles_uint8.dim() != 4 or tiles_uint8.shape[-1] != 3:
        raise ValueError(f"tiles must be (N, S, S, 3), got {tuple(tiles_uint8.shape)}")
    n, height, width, _ = tiles_uint8.shape
    device = tiles_uint8.device
    if device.type == "cpu":
        out = torch.empty((n, 3, height, width), dtype=torch.float32)
        out.copy_(tiles_uint8.permute(0, 3, 1, 2))  # (N, S, S, 3) -> (N, 3, S, S), uint8 -> float32
        mean, std = _mean_std()
        out.div_(255).sub_(mean).div_(std)  # ToTensor, then Normalize
    else:
        out = _normalize_by_table(tiles_uint8)
    return out if dtype == torch.float32 else out.to(dtype)


def _normalize_by_table(tiles_uint8: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 by table lookup, on the tiles' device."""
    n, height, width, _ = tiles_uint8.shape
    device = tiles_uint8.device
    table = _table_on(device)
    offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=device).view(1, 3, 1, 1)
    index = torch.empty((n, 3, height, width), dtype=torch.int32, device=device)
    index.copy_(tiles_uint8.permute(0, 3, 1, 2))  # (N, S, S, 3) -> (N, 3, S, S)
    index.add_(offsets)  # channel c looks up entries c * 256 .. c * 256 + 255
    return torch.index_select(table, 0, index.view(-1)).view(n, 3, height, width)
