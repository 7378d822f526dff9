"""Paged attention in plain torch (CPU and GPU): gather the cached K/V, then SDPA.

Requests whose query is a single token (decode) are batched into one SDPA call over a padded gather
of their caches (a boolean mask hides the padding). Prefill chunks run one SDPA call each: a chunk
that starts at position 0 attends to its own fresh K/V with ``is_causal``; a later chunk (chunked
prefill, prefix-cache hit) gathers its context and uses a bottom-right causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.decoder.attention.registry import AttentionMetadata


def is_available(device: str) -> bool:
    return True


def _slots(block_table: list[int], block_size: int, length: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(length)]


class TorchPagedBackend:
    name = "torch_paged"

    def validate_block_size(self, block_size: int) -> None:
        if not 1 <= block_size <= 4096:
            raise InvalidArgument(f"torch_paged needs 1 <= block_size <= 4096, got {block_size}")

    def prepare(self, meta: AttentionMetadata, device) -> None:
        qsl, ctx, bs = meta.query_start_loc, meta.context_lens, meta.block_size
        decode_rows, decode_slots, decode_lens = [], [], []
        prefills = []
        for i, q_len in enumerate(meta.query_lens):
            if q_len == 1 and ctx[i] > 1:
                decode_rows.append(qsl[i])
                decode_slots.append(_slots(meta.block_tables[i], bs, ctx[i]))
                decode_lens.append(ctx[i])
                continue
            start = ctx[i] - q_len  # tokens cached before this chunk
            entry = {"q": (qsl[i], qsl[i + 1]), "start": start}
            if start > 0:
                entry["slots"] = torch.tensor(_slots(meta.block_tables[i], bs, ctx[i]), device=device)
                q_pos = torch.arange(start, ctx[i], device=device)
                entry["mask"] = torch.arange(ctx[i], device=device)[None, :] <= q_pos[:, None]  # (q_len, ctx)
            prefills.append(entry)
        extra = {"prefills": prefills, "decode": None}
        if decode_rows:
            max_len = max(decode_lens)
            padded = [s + [0] * (max_len - len(s)) for s in decode_slots]
            lens = torch.tensor(decode_lens, device=device)
            mask = None
            if min(decode_lens) != max_len:
                mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[
                    :, None, None, :
                ]  # (B,1,1,L)
            extra["decode"] = {
                "rows": torch.tensor(decode_rows, device=device),
                "slots": torch.tensor(padded, device=device),  # (B, L)
                "mask": mask,
            }
        meta.extra = extra

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # (num_blocks * block_size, Hkv, D)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        gqa = q.shape[1] != num_kv_heads
        out = torch.empty_like(q)

        decode = meta.extra["decode"]
        if decode is not None:
            qd = q.index_select(0, decode["rows"]).unsqueeze(2)  # (B, H, 1, D)
            kd = k_flat[decode["slots"]].transpose(1, 2)  # (B, L, Hkv, D) -> (B, Hkv, L, D)
            vd = v_flat[decode["slots"]].transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=decode["mask"], scale=scale, enable_gqa=gqa
            )
            out.index_copy_(0, decode["rows"], od.squeeze(2))  # (B, H, 1, D) -> (B, H, D)

        for entry in meta.extra["prefills"]:
            s, e = entry["q"]
            qp = q[s:e].transpose(0, 1).unsqueeze(0)  # (n, H, D) -> (1, H, n, D)
            if entry["start"] == 0:
                kp = k[s:e].transpose(0, 1).unsqueeze(0)  # (n, Hkv, D) -> (1, Hkv, n, D)
                vp = v[s:e].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, is_causal=e - s > 1, scale=scale, enable_gqa=gqa
                )
            else:
                kp = k_flat[entry["slots"]].transpose(0, 1).unsqueeze(0)  # (ctx, Hkv, D) -> (1, Hkv, ctx, D)
                vp = v_flat[entry["slots"]].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, attn_mask=entry["mask"], scale=scale, enable_gqa=gqa
                )
            out[s:e] = op.squeeze(0).transpose(0, 1)  # (1, H, n, D) -> (n, H, D)
        return out
