"""flash-attn's paged varlen kernel (CUDA only).

``flash_attn_varlen_func`` with ``block_table`` reads K/V straight from the paged cache: ``k``/``v`` are
the cache tensors (num_blocks, block_size, Hkv, D), ``cu_seqlens_k`` the cumulative context lengths,
and ``causal=True`` aligns the mask bottom-right, which is what chunked prefill and prefix hits need.
Its paged path requires ``block_size % 256 == 0``. A static-shape decode step (``meta.static``, the
CUDA-graph path) runs ``flash_attn_with_kvcache`` with ``block_table`` and ``cache_seqlens``: one query
per sequence against its blocks, in place.
"""

from __future__ import annotations

import importlib.util

import torch

from services.common.errors import InvalidArgument
from services.decoder.attention.registry import AttentionMetadata

FLASH_BLOCK_MULTIPLE = 256


def is_available(device: str) -> bool:
    return (
        device == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    )


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def validate_block_size(self, block_size: int) -> None:
        if block_size % FLASH_BLOCK_MULTIPLE != 0:
            raise InvalidArgument(
                f"flash_attn's paged KV cache needs cache.block_size divisible by {FLASH_BLOCK_MULTIPLE}, "
                f"got {block_size}: set block_size to 256 or use attention_backend=torch_paged"
            )

    def prepare(self, meta: AttentionMetadata, device) -> None:
        lens = meta.query_lens
        max_blocks = max(len(t) for t in meta.block_tables)
        table = [t + [0] * (max_blocks - len(t)) for t in meta.block_tables]
        cu_k = [0]
        for c in meta.context_lens:
            cu_k.append(cu_k[-1] + c)
        meta.extra = {
            "cu_q": torch.tensor(meta.query_start_loc, dtype=torch.int32, device=device),
            "cu_k": torch.tensor(cu_k, dtype=torch.int32, device=device),
            "max_q": max(lens),
            "max_k": max(meta.context_lens),
            "block_table": torch.tensor(table, dtype=torch.int32, device=device),  # (B, max_blocks)
        }

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        if meta.static is not None:
            return self._with_kvcache(
                q.unsqueeze(1),  # (B, H, D) -> (B, 1, H, D)
                k_cache,
                v_cache,
                cache_seqlens=meta.static.context_lens,
                block_table=meta.static.block_table,
                softmax_scale=scale,
                causal=True,
            ).squeeze(1)  # (B, 1, H, D) -> (B, H, D)
        x = meta.extra
        return self._varlen(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=x["cu_q"],
            cu_seqlens_k=x["cu_k"],
            max_seqlen_q=x["max_q"],
            max_seqlen_k=x["max_k"],
            softmax_scale=scale,
            causal=True,
            block_table=x["block_table"],
        )  # (T, H, D)
