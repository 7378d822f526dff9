"""Paged decode that reads the KV cache in place, with a Triton kernel (``triton_kernels.paged_decode``).

Decode queries (one token after a non-empty context) run in one kernel launch per layer over the
batch: each sequence's blocks are read where they lie, with no gather, no padding in memory and no
mask tensor, so the cost follows the tokens attended to. Prefill chunks run the torch path's SDPA
(``torch_paged.run_prefills``). A static-shape decode step (``meta.static``, the CUDA-graph path) runs
the same kernel on the static buffers.

Used only when asked for (``attention_backend: triton_paged``). Available on CUDA where Triton is
installed, and on a machine without CUDA where Triton runs in its interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests run this kernel against the torch reference.
Any block size works: the kernel walks the context in 32-token tiles whatever the block size.
"""

from __future__ import annotations

import importlib.util

import torch

from services.common.errors import InvalidArgument
from services.decoder.attention.registry import AttentionMetadata
from services.decoder.attention.torch_paged import decode_rows, run_prefills, split_step, write_cache


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_available(device: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device == "cuda":
        return torch.cuda.is_available()
    from services.decoder.attention.triton_kernels import interpreted

    return interpreted()


class TritonPagedBackend:
    name = "triton_paged"

    def __init__(self):
        from services.decoder.attention.triton_kernels import paged_decode

        self._decode = paged_decode

    def validate_block_size(self, block_size: int) -> None:
        if not 1 <= block_size <= 4096:
            raise InvalidArgument(f"triton_paged needs 1 <= block_size <= 4096, got {block_size}")

    def prepare(self, meta: AttentionMetadata, device) -> None:
        decode, prefills = split_step(meta, device)
        extra = {"prefills": prefills, "decode": None}
        if decode:
            d = decode_rows(meta, decode, device)
            lens = [meta.context_lens[i] for i in decode]
            width = _cdiv(max(lens), meta.block_size)
            table = []
            for i, n in zip(decode, lens, strict=True):
                blocks = meta.block_tables[i][: _cdiv(n, meta.block_size)]
                table.append(blocks + [0] * (width - len(blocks)))
            d["table"] = torch.tensor(table, dtype=torch.int32, device=device)  # (B, W)
            d["lens"] = torch.tensor(lens, dtype=torch.int32, device=device)  # (B,)
            extra["decode"] = d
        meta.extra = extra

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        static = meta.static
        if static is not None:
            return self._decode(q, k_cache, v_cache, static.block_table, static.context_lens, scale)
        out = torch.empty_like(q)
        d = meta.extra["decode"]
        if d is not None:
            first, num = d["first"], d["num"]
            if d["rows"] is None:  # rows first..first+B-1: the kernel writes into ``out`` in place
                self._decode(q[first : first + num], k_cache, v_cache, d["table"], d["lens"], scale,
                             out=out[first : first + num])  # fmt: skip
            else:
                od = self._decode(
                    q.index_select(0, d["rows"]), k_cache, v_cache, d["table"], d["lens"], scale
                )
                out.index_copy_(0, d["rows"], od)
        run_prefills(q, k, v, k_cache, v_cache, meta.extra["prefills"], out, scale)
        return out
