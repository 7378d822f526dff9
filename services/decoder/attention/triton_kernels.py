"""A Triton kernel for paged decode attention: one query per sequence, read against its blocks in place.

The cache layout is the registry's: ``k_cache``/``v_cache`` (num_blocks, block_size, Hkv, D). Program
``(s, h)`` handles sequence ``s`` and KV head ``h``: the ``G = H / Hkv`` query heads that share that KV
head are the rows of one (G, D) query tile (padded to 16 rows for ``tl.dot``), so every cached K/V row
is read once per KV head, never expanded for GQA. The context is walked in tiles of ``BLOCK_N`` tokens;
token ``n`` lives at row ``n % block_size`` of block ``block_table[s, n // block_size]``, so any block
size works and nothing is gathered or padded in memory. Softmax is online (running max and sum, fp32).

The context length is read on the device (``context_lens[s]``) and bounds the loop there, so a launch
has no host-side dependence on the lengths: the same launch replays in a CUDA graph whatever they are.

On a machine without CUDA the same kernel runs in Triton's interpreter, on CPU tensors, when
``TRITON_INTERPRET=1`` was set before Triton was imported (``interpreted()`` says whether it was): the
tests check this code, not a copy of it, against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors) in this process."""
    return bool(triton.knobs.runtime.interpret)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def paged_decode_kernel(
    q_ptr,  # (B, H, D)
    k_ptr,  # (num_blocks, block_size, Hkv, D)
    v_ptr,
    out_ptr,  # (B, H, D)
    table_ptr,  # (B, W) int32
    lens_ptr,  # (B,) int32
    scale,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_ob,
    stride_oh,
    stride_tb,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + seq)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < ctx
        block = tl.load(table_ptr + seq * stride_tb + n // BLOCK_SIZE, mask=n_ok, other=0)
        row = block.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch  # (N,)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale  # (G, N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])  # (G, N)
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """Attention of ``q`` (B, H, D), one query per sequence, over the first ``context_lens[b]`` tokens
    of sequence ``b``'s blocks ``block_table[b]`` (B, W) int32; returns (B, H, D) in ``q``'s dtype.
    A sequence with context length 0 gets zeros. CPU tensors need Triton's interpreter (``interpreted``)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("paged_decode needs unit stride on the head dimension")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout")
    paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, out, block_table, context_lens, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        BLOCK_SIZE=block_size, GROUP=group, G_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, D_PAD=max(16, _next_pow2(head_dim)), BLOCK_N=block_n,
    )  # fmt: skip
    return out
