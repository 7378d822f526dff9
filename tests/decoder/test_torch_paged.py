"""The torch paged backend against a plain reference, for every decode strategy and cache layout.

The reference rebuilds each request's K/V token by token from the block table and runs causal
attention in float64, so a wrong block, a stale slot or a padding leak shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from services.decoder.attention.registry import AttentionMetadata
from services.decoder.attention.torch_paged import TorchPagedBackend

BS, H, HKV, D, NUM_BLOCKS = 4, 4, 2, 8, 64


def reference(q, k, v, k_cache, v_cache, slots, qsl, ctx, tables):
    """float64 attention of each request's queries over its cached tokens (after this step's writes)."""
    kf = k_cache.clone().view(-1, HKV, D)  # (num_blocks * bs, Hkv, D)
    vf = v_cache.clone().view(-1, HKV, D)
    kf[slots] = k
    vf[slots] = v
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, table in enumerate(tables):
        s, e, n = qsl[i], qsl[i + 1], ctx[i]
        idx = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        kk = kf[idx].double().repeat_interleave(H // HKV, dim=1)  # (n, Hkv, D) -> (n, H, D)
        vv = vf[idx].double().repeat_interleave(H // HKV, dim=1)
        qq = q[s:e].double()  # (m, H, D)
        scores = torch.einsum("mhd,nhd->hmn", qq, kk) / math.sqrt(D)  # (H, m, n)
        q_pos = torch.arange(n - (e - s), n)
        scores = scores.masked_fill(torch.arange(n)[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), vv)
    return out


def batch(seed: int):
    """Decodes with scattered and consecutive tables, a fresh prefill, and a prefill after a prefix."""
    g = torch.Generator().manual_seed(seed)
    # (query length, context length, block table)
    reqs = [
        (1, 9, [7, 3, 20]),  # decode, scattered blocks, partial last block
        (1, 8, [11, 12]),  # decode, consecutive blocks, full last block
        (1, 2, [30]),  # decode, a single block
        (5, 5, [40, 41]),  # prefill from position 0
        (3, 10, [50, 5, 6]),  # prefill after 7 cached tokens, scattered
        (1, 13, [21, 22, 23, 24]),  # decode, consecutive, partial
        (2, 7, [33, 34]),  # prefill after 5 cached tokens, consecutive
    ]
    qsl, ctx, tables, slots = [0], [], [], []
    for q_len, n, table in reqs:
        qsl.append(qsl[-1] + q_len)
        ctx.append(n)
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(n - q_len, n)]
    t = qsl[-1]
    q = torch.randn(t, H, D, generator=g)
    k = torch.randn(t, HKV, D, generator=g)
    v = torch.randn(t, HKV, D, generator=g)
    k_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=g)
    return q, k, v, k_cache, v_cache, slots, qsl, ctx, tables


@pytest.mark.parametrize("strategy", ["per_sequence", "padded", "auto"])
@pytest.mark.parametrize("order", ["mixed", "decode_first"])
def test_backend_matches_reference(strategy, order):
    q, k, v, k_cache, v_cache, slots, qsl, ctx, tables = batch(0)
    if order == "decode_first":  # decode rows 0..B-1 take the slice path, not the index path
        keep = [0, 1, 2, 5]
        lens = [qsl[i + 1] - qsl[i] for i in keep]
        rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in keep])
        q, k, v = q[rows], k[rows], v[rows]
        slots = [slots[r] for r in rows.tolist()]
        ctx, tables = [ctx[i] for i in keep], [tables[i] for i in keep]
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
    want = reference(q, k, v, k_cache, v_cache, slots, qsl, ctx, tables)
    backend = TorchPagedBackend(decode_strategy=strategy)
    meta = AttentionMetadata(torch.tensor(slots), qsl, ctx, tables, BS)
    backend.prepare(meta, "cpu")
    kc, vc = k_cache.clone(), v_cache.clone()
    got = backend.forward(q, k, v, kc, vc, meta, D**-0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # the step's K/V landed in its slots
    torch.testing.assert_close(kc.view(-1, HKV, D)[slots], k)
    torch.testing.assert_close(vc.view(-1, HKV, D)[slots], v)


def test_auto_strategy_by_device():
    backend = TorchPagedBackend()
    assert backend._strategy("cpu") == "per_sequence"
    assert backend._strategy(torch.device("cpu")) == "per_sequence"
    assert backend._strategy("cuda") == "padded"
