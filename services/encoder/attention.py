"""Attention backends for the vision tower, behind a small registry.

The ViT's attention is full (non-causal) self-attention over equal-length sequences (1 CLS + 1024
patches per 448px tile), so a backend is one function::

    attend(q, k, v, scale) -> out        # q, k, v, out: (tiles, tokens, heads, head_dim)

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; every device and dtype.
- ``flash_attn``: the flash-attn package's ``flash_attn_func``; CUDA, fp16/bf16 only, when installed.

``resolve_backend("auto", device, dtype)`` picks flash-attn where it can run and SDPA elsewhere, so the
same configuration works on a laptop and on the GPU pool. Adding a backend is one ``register`` call.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.errors import FailedPrecondition, InvalidArgument

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    attend: AttendFn
    #: Whether this backend can run on ``device`` with ``dtype`` in this process.
    supports: Callable[[torch.device, torch.dtype], bool]
    #: Higher wins when ``auto`` chooses among the supported backends.
    preference: int = 0


_REGISTRY: dict[str, AttentionBackend] = {}


def register(backend: AttentionBackend) -> AttentionBackend:
    if backend.name in _REGISTRY or backend.name == "auto":
        raise InvalidArgument(f"attention backend {backend.name!r} is already registered or reserved")
    _REGISTRY[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """The backend called ``name`` (or the best supported one for ``auto``), checked against the device."""
    device = torch.device(device)
    if name == "auto":
        usable = [b for b in _REGISTRY.values() if b.supports(device, dtype)]
        if not usable:
            raise FailedPrecondition(f"no attention backend supports {device} with {dtype}")
        return max(usable, key=lambda b: b.preference)
    backend = _REGISTRY.get(name)
    if backend is None:
        raise InvalidArgument(f"unknown attention backend {name!r}; one of {['auto', *available_backends()]}")
    if not backend.supports(device, dtype):
        raise FailedPrecondition(
            f"attention backend {name!r} cannot run on {device} with {dtype} here "
            "(flash_attn needs CUDA, fp16/bf16 and the flash-attn package); use 'auto' or 'sdpa'"
        )
    return backend


# -- SDPA ---------------------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # (B, L, H, Dh) -> (B, H, L, Dh): SDPA's layout.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False, scale=scale
    )
    return out.transpose(1, 2)  # (B, H, L, Dh) -> (B, L, H, Dh)


SDPA = register(AttentionBackend("sdpa", _sdpa, supports=lambda device, dtype: True, preference=0))


# -- flash-attn ---------------------------------------------------------------------------------------
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_supports(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.is_available()
        and flash_attn_installed()
    )


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes (B, L, H, Dh) directly and any strides but the last dimension's (the views of
    # the fused qkv output have unit stride there); it copies only a tensor whose last stride is not 1.
    return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)


FLASH_ATTN = register(AttentionBackend("flash_attn", _flash, supports=_flash_supports, preference=10))
