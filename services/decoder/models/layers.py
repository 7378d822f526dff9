"""Tensor-parallel building blocks (Megatron splits) and the norms/rotary helpers they need.

Column-parallel layers keep ``1/tp`` of the output features (q/k/v, gate/up); row-parallel layers
keep ``1/tp`` of the input features and sum the partial outputs with ``all_reduce`` (o, down). Each
layer knows how to take its shard from a full checkpoint tensor (``load``), so the loader never
needs to know the split rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.common.errors import FailedPrecondition


@dataclass
class TPContext:
    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed process group for all_reduce; None when size == 1


def shard(tensor: torch.Tensor, dim: int, tp: TPContext, what: str) -> torch.Tensor:
    if tensor.shape[dim] % tp.size != 0:
        raise FailedPrecondition(
            f"{what}: dimension {dim} of size {tensor.shape[dim]} does not split over {tp.size} ranks"
        )
    return tensor.chunk(tp.size, dim=dim)[tp.rank]


class ParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W sharded by rows (column-parallel) or columns (row-parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext, row_parallel: bool):
        super().__init__()
        self.tp = tp
        self.row_parallel = row_parallel
        in_local = in_features // tp.size if row_parallel else in_features
        out_local = out_features if row_parallel else out_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None

    def load(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None, what: str = ""
    ) -> None:
        """Load the full tensors of one or several fused projections (e.g. q, k, v), each sharded."""
        dim = 1 if self.row_parallel else 0
        w = torch.cat([shard(t, dim, self.tp, what) for t in weights], dim=0)
        if w.shape != self.weight.shape:
            raise FailedPrecondition(
                f"{what}: weight shape {tuple(w.shape)} != expected {tuple(self.weight.shape)}"
            )
        self.weight.data = w.to(self.weight.dtype).contiguous()
        if self.bias is not None:
            if not biases:
                raise FailedPrecondition(f"{what}: the checkpoint has no bias for a biased projection")
            b = biases[0] if self.row_parallel else torch.cat([shard(t, 0, self.tp, what) for t in biases])
            self.bias.data = b.to(self.bias.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """Computed in float32 and cast back before the weight, as transformers' Llama/Qwen2 do."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

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
