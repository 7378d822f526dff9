"""Attention backends and the per-step metadata they share.

Every backend reads and writes the same paged cache layout, one pair of tensors per layer:
``k_cache``/``v_cache`` of shape (num_blocks, block_size, num_kv_heads, head_dim). A token at position
``p`` of a request lives in slot ``block_ids[p // block_size] * block_size + p % block_size``.

A step is a flat batch of T tokens from B requests (varlen): request ``i`` contributes the queries
``query_start_loc[i]:query_start_loc[i+1]`` and attends to its first ``context_lens[i]`` cached tokens
(which include the step's own tokens, written before attention runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.errors import FailedPrecondition, InvalidArgument


@dataclass
class StaticDecode:
    """A decode-only step in fixed-shape device tensors (the CUDA-graph path, ``engine/decode_graphs``):
    row ``b`` is one query against the blocks ``block_table[b]`` (B, W) int32 and the first
    ``context_lens[b]`` (B,) int32 tokens in them. The host lists of ``AttentionMetadata`` are empty:
    nothing about the step is read on the host. Padding rows have length 1 and read a scratch block;
    their outputs are ignored."""

    block_table: Any
    context_lens: Any


@dataclass
class AttentionMetadata:
    slot_mapping: Any  # (T,) int64 tensor on the device
    query_start_loc: list[int]  # B + 1 offsets into the flat token dimension
    context_lens: list[int]  # B: tokens in the cache for each request after this step's writes
    block_tables: list[list[int]]  # B lists of block ids
    block_size: int
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific, built by ``prepare``
    static: StaticDecode | None = None  # set instead of ``prepare`` for a static-shape decode step

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]


class AttentionBackend(Protocol):
    name: str

    def validate_block_size(self, block_size: int) -> None: ...

    def prepare(self, meta: AttentionMetadata, device: Any) -> None:
        """Build the backend's per-step tensors once; every layer reuses them."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """q (T, H, D), k/v (T, Hkv, D) -> (T, H, D); writes k/v into the cache first. With
        ``meta.static`` set, T is the static batch and every row is a decode query."""


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}
_AVAILABLE: dict[str, Callable[[str], bool]] = {}


def register_backend(
    name: str, factory: Callable[[], AttentionBackend], available: Callable[[str], bool]
) -> None:
    _BACKENDS[name] = factory
    _AVAILABLE[name] = available


def is_backend_available(name: str, device: str) -> bool:
    _load_builtin()
    return name in _AVAILABLE and _AVAILABLE[name](device)


def resolve_backend_name(name: str, device: str, block_size: int) -> str:
    """``auto``: flash-attn on CUDA when installed and ``block_size`` suits it, else the torch path.
    ``triton_paged`` is used only when asked for by name."""
    _load_builtin()
    if name == "auto":
        if device == "cuda" and is_backend_available("flash_attn", device) and block_size % 256 == 0:
            return "flash_attn"
        return "torch_paged"
    if name not in _BACKENDS:
        raise InvalidArgument(f"unknown attention backend {name!r}; one of {sorted(_BACKENDS)}")
    if not _AVAILABLE[name](device):
        raise FailedPrecondition(f"attention backend {name!r} is not available on {device}")
    return name


def get_backend(name: str, device: str, block_size: int) -> AttentionBackend:
    backend = _BACKENDS[resolve_backend_name(name, device, block_size)]()
    backend.validate_block_size(block_size)
    return backend


def _load_builtin() -> None:
    if _BACKENDS:
        return
    from services.decoder.attention import flash, torch_paged, triton_paged

    register_backend("torch_paged", torch_paged.TorchPagedBackend, torch_paged.is_available)
    register_backend("flash_attn", flash.FlashAttnBackend, flash.is_available)
    register_backend("triton_paged", triton_paged.TritonPagedBackend, triton_paged.is_available)
