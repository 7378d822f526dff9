"""Tensor-parallel building blocks (Megatron splits) and the norms/rotary helpers they need.

Column-parallel layers keep ``1/tp`` of the output features (q/k/v, gate/up); row-parallel layers
keep ``1/tp`` of the input features and sum the partial outputs with ``all_reduce`` (o, down). Each
layer knows how to take its shard of a stored weight (``load``): it reads only that slice of the
checkpoint (``read_part``) and copies it into its parameter in place, on whatever device the
parameter lives, so the loader never needs to know the split rules and never moves a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import SliceReader
from services.common.errors import FailedPrecondition
from services.decoder.models.registry import Source


@dataclass
class TPContext:
    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed process group for all_reduce; None when size == 1


def read_part(
    reader: SliceReader, source: Source, split_dim: int | None, tp: TPContext, what: str
) -> torch.Tensor:
    """This rank's part of ``source`` (its rows, for a part of a fused tensor), split over the ranks
    along ``split_dim`` (0: rows, 1: columns; None: the whole part on every rank); only that slice is read."""
    shape = reader.shape(source.key)
    start, stop = source.rows or (0, shape[0])
    if split_dim is None:
        return reader.read(source.key, slice(start, stop))
    size = stop - start if split_dim == 0 else shape[1]
    if size % tp.size != 0:
        raise FailedPrecondition(
            f"{what}: dimension {split_dim} of size {size} does not split over {tp.size} ranks"
        )
    n = size // tp.size
    lo = tp.rank * n
    if split_dim == 0:
        return reader.read(source.key, slice(start + lo, start + lo + n))
    return reader.read(source.key, slice(start, stop), slice(lo, lo + n))


def copy_parts(param: torch.Tensor, parts: list[torch.Tensor], what: str) -> None:
    """Copy ``parts`` stacked by rows into ``param`` in place (its storage and device stay its own)."""
    shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
    if shape != tuple(param.shape):
        raise FailedPrecondition(f"{what}: weight shape {shape} != expected {tuple(param.shape)}")
    row = 0
    with torch.no_grad():
        for t in parts:
            param[row : row + t.shape[0]].copy_(t)
            row += t.shape[0]


def load_whole(param: torch.Tensor, reader: SliceReader, source: Source, what: str) -> None:
    """A replicated weight (norms, embedding, head): every rank copies all of ``source``."""
    copy_parts(param, [read_part(reader, source, None, TPContext(), what)], what)


class ParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W sharded by rows (column-parallel) or columns (row-parallel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPContext,
        row_parallel: bool,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.tp = tp
        self.row_parallel = row_parallel
        in_local = in_features // tp.size if row_parallel else in_features
        out_local = out_features if row_parallel else out_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False) if bias else None

    def load(
        self, reader: SliceReader, weights: list[Source], biases: list[Source] | None = None, what: str = ""
    ) -> None:
        """Load this rank's shard of one or several fused projections (e.g. q, k, v): each part is
        split over the ranks on its own and the shards are stacked in order."""
        dim = 1 if self.row_parallel else 0
        copy_parts(self.weight, [read_part(reader, s, dim, self.tp, what) for s in weights], what)
        if self.bias is not None:
            if not biases:
                raise FailedPrecondition(f"{what}: the checkpoint has no bias for a biased projection")
            if self.row_parallel:  # added once, after the all_reduce: every rank holds all of it
                copy_parts(self.bias, [read_part(reader, biases[0], None, self.tp, what)], what)
            else:
                copy_parts(self.bias, [read_part(reader, s, 0, self.tp, what) for s in biases], what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """Computed in float32 and cast back before the weight, as transformers' Llama/Qwen2 do."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """RoPE from precomputed inverse frequencies; cos/sin in float32, cast to the activations' dtype."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, rotary_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        self.attention_scaling = attention_scaling
        self.rotary_dim = rotary_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]  # (T, rotary_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rotary_dim)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]  # (T, 1, rotary_dim)
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, heads, head_dim); rotates the first ``rotary_dim`` features."""
        if self.rotary_dim == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
