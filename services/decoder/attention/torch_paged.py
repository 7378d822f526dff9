"""Paged attention in plain torch (CPU and GPU): read the cached K/V block by block, then SDPA.

Reads go by whole blocks: one ``index_select`` over the block dimension copies each needed block as a
single contiguous row (``block_size * Hkv * D`` elements), instead of indexing token slots one by one.
A request whose blocks are consecutive in the cache is not copied at all: its K/V is a view.

Decode (a single query token after a non-empty context) has two strategies:

* ``per_sequence`` (the default on CPU): the needed blocks of all decoding requests are gathered into
  one flat buffer, and each request runs its own SDPA over its exact context, a view of that buffer.
  No padding and no mask: the batch's attention costs what its tokens cost, and on CPU the per-call
  overhead is small next to that.
* ``padded`` (the default on GPU, where launches dominate): one SDPA over the batch, each request's
  blocks gathered into a row padded to the longest, with a boolean mask hiding the padding.

Prefill chunks run one SDPA each: a chunk that starts at position 0 attends to its own fresh K/V with
``is_causal``; a later chunk (chunked prefill, prefix-cache hit) reads its context from the cache and
uses a bottom-right causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.decoder.attention.registry import AttentionMetadata, StaticDecode

DECODE_STRATEGIES = ("auto", "per_sequence", "padded")


def is_available(device: str) -> bool:
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _consecutive(blocks: list[int]) -> bool:
    """True when the blocks are ``b, b+1, ...``: their tokens form one contiguous stretch of the cache."""
    return blocks[-1] - blocks[0] == len(blocks) - 1 and all(
        blocks[j + 1] == blocks[j] + 1 for j in range(len(blocks) - 1)
    )


def split_step(meta: AttentionMetadata, device) -> tuple[list[int], list[dict]]:
    """The step's decode requests (indices: one query after a non-empty context) and the prefill
    chunks' entries for ``run_prefills``."""
    qsl, ctx, bs = meta.query_start_loc, meta.context_lens, meta.block_size
    decode: list[int] = []
    prefills = []
    for i, q_len in enumerate(meta.query_lens):
        if q_len == 1 and ctx[i] > 1:
            decode.append(i)
            continue
        start = ctx[i] - q_len  # tokens cached before this chunk
        entry = {"q": (qsl[i], qsl[i + 1]), "start": start, "len": ctx[i]}
        if start > 0:
            blocks = meta.block_tables[i][: _cdiv(ctx[i], bs)]
            entry["block0"] = blocks[0] if _consecutive(blocks) else None
            entry["blocks"] = None if _consecutive(blocks) else torch.tensor(blocks, device=device)
            q_pos = torch.arange(start, ctx[i], device=device)
            entry["mask"] = torch.arange(ctx[i], device=device)[None, :] <= q_pos[:, None]  # (q_len, ctx)
        prefills.append(entry)
    return decode, prefills


def decode_rows(meta: AttentionMetadata, decode: list[int], device) -> dict:
    """Where the decode queries sit in the flat batch: usually rows first..first+B-1 (then a slice,
    ``rows`` None), else an index tensor."""
    rows = [meta.query_start_loc[i] for i in decode]
    first = rows[0]
    contiguous = rows == list(range(first, first + len(rows)))
    return {
        "rows": None if contiguous else torch.tensor(rows, device=device),
        "first": first,
        "num": len(rows),
    }


def write_cache(k, v, k_cache, v_cache, slot_mapping):
    """Write the step's K/V (T, Hkv, D) into their slots; the caches as (slots, Hkv, D) views."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # (num_blocks * block_size, Hkv, D)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)
    return k_flat, v_flat


def run_prefills(q, k, v, k_cache, v_cache, prefills: list[dict], out, scale: float) -> None:
    """One SDPA per prefill chunk (``split_step``'s entries), written into ``out`` (T, H, D)."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    gqa = q.shape[1] != num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    for entry in prefills:
        s, e = entry["q"]
        qp = q[s:e].transpose(0, 1).unsqueeze(0)  # (n, H, D) -> (1, H, n, D)
        if entry["start"] == 0:
            kp = k[s:e].transpose(0, 1).unsqueeze(0)  # (n, Hkv, D) -> (1, Hkv, n, D)
            vp = v[s:e].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=e - s > 1, scale=scale, enable_gqa=gqa)
        else:
            n = entry["len"]
            if entry["blocks"] is None:
                first = entry["block0"] * block_size
                kc, vc = k_flat[first : first + n], v_flat[first : first + n]  # (ctx, Hkv, D) views
            else:
                kc = k_cache.index_select(0, entry["blocks"]).view(-1, num_kv_heads, head_dim)[:n]
                vc = v_cache.index_select(0, entry["blocks"]).view(-1, num_kv_heads, head_dim)[:n]
            kp = kc.transpose(0, 1).unsqueeze(0)  # (ctx, Hkv, D) -> (1, Hkv, ctx, D)
            vp = vc.transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=entry["mask"], scale=scale, enable_gqa=gqa
            )
        out[s:e] = op.squeeze(0).transpose(0, 1)  # (1, H, n, D) -> (n, H, D)


def decode_static_padded(q, k_cache, v_cache, static: StaticDecode, scale: float):
    """The static-shape decode in torch: every row's whole table width (W blocks) gathered and masked
    past its length. Shapes depend on the buffers only, never on the lengths (graph-safe); it reads
    W blocks per row, so it is the reference of the static path, not its fast kernel."""
    num_kv_heads, head_dim, block_size = k_cache.shape[2], k_cache.shape[3], k_cache.shape[1]
    b, w = static.block_table.shape
    flat = static.block_table.reshape(-1)  # (B * W,)
    kd = k_cache.index_select(0, flat).view(b, w * block_size, num_kv_heads, head_dim).transpose(1, 2)
    vd = v_cache.index_select(0, flat).view(b, w * block_size, num_kv_heads, head_dim).transpose(1, 2)
    # (B * W, bs, Hkv, D) -> (B, L, Hkv, D) -> (B, Hkv, L, D)
    visible = torch.arange(w * block_size, device=q.device)[None, :] < static.context_lens[:, None]  # (B, L)
    od = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        kd,
        vd,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != num_kv_heads,
    )  # (B, H, 1, D)
    return od.squeeze(2)  # (B, H, D)


class TorchPagedBackend:
    name = "torch_paged"

    def __init__(self, decode_strategy: str = "auto"):
        if decode_strategy not in DECODE_STRATEGIES:
            raise InvalidArgument(
                f"decode_strategy must be one of {DECODE_STRATEGIES}, got {decode_strategy!r}"
            )
        self.decode_strategy = decode_strategy

    def validate_block_size(self, block_size: int) -> None:
        if not 1 <= block_size <= 4096:
            raise InvalidArgument(f"torch_paged needs 1 <= block_size <= 4096, got {block_size}")

    def _strategy(self, device) -> str:
        if self.decode_strategy != "auto":
            return self.decode_strategy
        return "per_sequence" if torch.device(device).type == "cpu" else "padded"

    def prepare(self, meta: AttentionMetadata, device) -> None:
        decode, prefills = split_step(meta, device)
        extra = {"prefills": prefills, "decode": None}
        if decode:
            if self._strategy(device) == "per_sequence":
                extra["decode"] = self._prepare_per_sequence(meta, decode, device)
            else:
                extra["decode"] = self._prepare_padded(meta, decode, device)
        meta.extra = extra

    @staticmethod
    def _prepare_per_sequence(meta: AttentionMetadata, decode: list[int], device) -> dict:
        bs, ctx = meta.block_size, meta.context_lens
        d = decode_rows(meta, decode, device)
        gathered: list[int] = []
        seqs = []  # (row, context length, first block of a consecutive run or None, token offset)
        for i in decode:
            row, n = meta.query_start_loc[i], ctx[i]
            blocks = meta.block_tables[i][: _cdiv(n, bs)]
            if _consecutive(blocks):
                seqs.append((row, n, blocks[0], 0))
            else:
                seqs.append((row, n, None, len(gathered) * bs))
                gathered += blocks
        d["strategy"] = "per_sequence"
        d["seqs"] = seqs
        d["blocks"] = torch.tensor(gathered, device=device) if gathered else None
        return d

    @staticmethod
    def _prepare_padded(meta: AttentionMetadata, decode: list[int], device) -> dict:
        bs = meta.block_size
        d = decode_rows(meta, decode, device)
        lens = [meta.context_lens[i] for i in decode]
        max_blocks = _cdiv(max(lens), bs)
        table = []
        for i, n in zip(decode, lens, strict=True):
            blocks = meta.block_tables[i][: _cdiv(n, bs)]
            table += blocks + [0] * (max_blocks - len(blocks))
        d["strategy"] = "padded"
        d["blocks"] = torch.tensor(table, device=device)  # (B * max_blocks,)
        d["max_len"] = max_blocks * bs
        d["mask"] = None
        if min(lens) != max_blocks * bs:
            len_t = torch.tensor(lens, device=device)
            d["mask"] = (torch.arange(max_blocks * bs, device=device)[None, :] < len_t[:, None])[
                :, None, None, :
            ]  # (B, 1, 1, L)
        return d

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        k_flat, v_flat = write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.static is not None:
            return decode_static_padded(q, k_cache, v_cache, meta.static, scale)
        gqa = q.shape[1] != k_cache.shape[2]
        out = torch.empty_like(q)
        decode = meta.extra["decode"]
        if decode is not None:
            if decode["strategy"] == "per_sequence":
                self._decode_per_sequence(q, k_flat, v_flat, k_cache, v_cache, decode, out, scale)
            else:
                self._decode_padded(q, k_cache, v_cache, decode, out, scale, gqa)
        run_prefills(q, k, v, k_cache, v_cache, meta.extra["prefills"], out, scale)
        return out

    @staticmethod
    def _decode_per_sequence(q, k_flat, v_flat, k_cache, v_cache, d, out, scale) -> None:
        """One SDPA per request over its exact context; consecutive blocks are read in place.

        A decode query is one token, so the ``G = H / Hkv`` query heads that share a KV head can be
        that head's G query rows: SDPA then sees ``(1, Hkv, G, D)`` against ``(1, Hkv, n, D)``, with
        no GQA expansion and no mask (every cached token is visible). Query head ``h`` reads KV head
        ``h // G``, the same pairing as ``enable_gqa``.
        """
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_flat.shape[1]
        group = num_heads // num_kv_heads
        block_size = k_cache.shape[1]
        qg = q.reshape(-1, 1, num_kv_heads, group, head_dim)  # (T, H, D) -> (T, 1, Hkv, G, D)
        if d["blocks"] is not None:
            kg = k_cache.index_select(0, d["blocks"]).view(-1, num_kv_heads, head_dim)  # (N * bs, Hkv, D)
            vg = v_cache.index_select(0, d["blocks"]).view(-1, num_kv_heads, head_dim)
        row_stride = num_kv_heads * head_dim
        outs = []
        for row, n, block0, offset in d["seqs"]:
            if block0 is not None:
                kt, vt, first = k_flat, v_flat, block0 * block_size  # read the cache in place
            else:
                kt, vt, first = kg, vg, offset
            # tokens first..first+n-1 of a (tokens, Hkv, D) tensor as (1, Hkv, n, D), in one call
            size, stride = (1, num_kv_heads, n, head_dim), (n * row_stride, head_dim, row_stride, 1)
            ks = kt.as_strided(size, stride, kt.storage_offset() + first * row_stride)
            vs = vt.as_strided(size, stride, vt.storage_offset() + first * row_stride)
            outs.append(F.scaled_dot_product_attention(qg[row], ks, vs, scale=scale))  # (1, Hkv, G, D)
        od = torch.cat(outs).view(len(outs), num_heads, head_dim)  # (B, Hkv, G, D) -> (B, H, D)
        if d["rows"] is None:
            out[d["first"] : d["first"] + len(outs)] = od
        else:
            out.index_copy_(0, d["rows"], od)

    @staticmethod
    def _decode_padded(q, k_cache, v_cache, d, out, scale, gqa) -> None:
        """One SDPA over the batch, each request's blocks padded to the longest and masked."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        b, max_len = d["num"], d["max_len"]
        first = d["first"]
        qd = q[first : first + b] if d["rows"] is None else q.index_select(0, d["rows"])
        qd = qd.unsqueeze(2)  # (B, H, D) -> (B, H, 1, D)
        kd = k_cache.index_select(0, d["blocks"]).view(b, max_len, num_kv_heads, head_dim).transpose(1, 2)
        vd = v_cache.index_select(0, d["blocks"]).view(b, max_len, num_kv_heads, head_dim).transpose(1, 2)
        # (B * max_blocks, bs, Hkv, D) -> (B, L, Hkv, D) -> (B, Hkv, L, D)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d["mask"], scale=scale, enable_gqa=gqa)
        od = od.squeeze(2)  # (B, H, 1, D) -> (B, H, D)
        if d["rows"] is None:
            out[first : first + b] = od
        else:
            out.index_copy_(0, d["rows"], od)
