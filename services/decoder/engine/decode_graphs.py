"""Static-shape decode steps: one CUDA graph per batch-size bucket (``compile.cuda_graphs``).

A step whose every request decodes one token (no prefill chunk, no image row, every row sampled) is
padded to the smallest bucket that holds it (1, 2, 4, 8, then every 16 up to ``max_num_seqs``) and
run on static device buffers, the same tensors every step of that bucket:

* ``input_ids``/``positions``/``slot_mapping`` (bucket,), ``context_lens`` (bucket,) int32 and
  ``block_table`` (bucket, W) int32, W = the blocks of ``max_model_len`` tokens;
* the engine thread ``stage``s a step into host tensors already padded to the bucket (page-locked on
  CUDA, from the caching host allocator, so a step being staged never overwrites one still copying);
  the device thread copies them into the buffers without blocking, fills the placeholders of
  overlapped scheduling (``pending``) from the running step's sampled ids on the device, and replays
  the bucket's graph: the whole model, every layer's attention reading ``meta.static``. The logits of
  the real rows are computed after it, eagerly (one GEMM; the graph keeps only the hidden states).
* Padding rows carry token 0 at position 0, read and write one scratch block past the block manager's
  (``pad_block``; the KV cache has one block more) with context length 1; their outputs are dropped.
  Table columns past a row's length keep stale ids from earlier steps: valid blocks, never read.

On CUDA every bucket is captured once, largest first, sharing one memory pool, at start-up. On the CPU
the same static path runs eagerly (nothing to capture): the tests hold it to the dynamic path's tokens
and to unchanged buffers. Prefill, mixed and multimodal steps run the eager dynamic path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.decoder.attention.registry import AttentionMetadata, StaticDecode

log = logging.getLogger(__name__)


def buckets_for(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, up to and including ``max_num_seqs``."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16))
    return sorted(sizes | {max_num_seqs})


@dataclass
class StaticStep:
    """A decode step padded to its bucket, in host tensors; ``num`` rows are real."""

    num: int
    bucket: int
    input_ids: torch.Tensor  # (bucket,) int64
    positions: torch.Tensor  # (bucket,) int64
    slot_mapping: torch.Tensor  # (bucket,) int64
    context_lens: torch.Tensor  # (bucket,) int32
    block_table: torch.Tensor  # (bucket, w) int32, w = the step's widest row


def _host(values: list, dtype: torch.dtype, pin: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if shape is not None:
        t = t.view(shape)
    return t.pin_memory() if pin else t


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int, device,
                 pad_block: int, capture: bool):  # fmt: skip
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.device, self.capture = block_size, torch.device(device), capture
        self.buckets = buckets_for(max_num_seqs)
        self.pad_block = pad_block
        self.max_width = -(-max_model_len // block_size)
        n, dev = self.buckets[-1], self.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), pad_block * block_size, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_table = torch.full((n, self.max_width), pad_block, dtype=torch.int32, device=dev)
        self._meta = {b: self._bucket_meta(b) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each graph's output, (bucket, hidden)
        self.replays = 0  # static steps run (replayed on CUDA, eager on the CPU)

    def _bucket_meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=[],
            context_lens=[],
            block_tables=[],
            block_size=self.block_size,
            static=StaticDecode(self.block_table[:b], self.context_lens[:b]),
        )

    def bucket_of(self, num: int) -> int | None:
        return next((b for b in self.buckets if b >= num), None)

    def meta(self, step: StaticStep) -> AttentionMetadata:
        return self._meta[step.bucket]

    # -- the engine thread ---------------------------------------------------------------------------
    def stage(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int],
              tables: list[list[int]], pin: bool) -> StaticStep | None:  # fmt: skip
        """The step padded to its bucket, in host tensors; None when no bucket holds it."""
        num = len(ids)
        bucket = self.bucket_of(num)
        if bucket is None:
            return None
        pad = bucket - num
        bs = self.block_size
        width = max(-(-n // bs) for n in lens)
        rows = [t[: -(-n // bs)] for t, n in zip(tables, lens, strict=True)]
        table = [r + [self.pad_block] * (width - len(r)) for r in rows] + [[self.pad_block] * width] * pad
        return StaticStep(
            num=num,
            bucket=bucket,
            input_ids=_host(ids + [0] * pad, torch.long, pin),
            positions=_host(positions + [0] * pad, torch.long, pin),
            slot_mapping=_host(slots + [self.pad_block * bs] * pad, torch.long, pin),
            context_lens=_host(lens + [1] * pad, torch.int32, pin),
            block_table=_host(table, torch.int32, pin, (bucket, width)),
        )

    # -- the device thread ---------------------------------------------------------------------------
    def _forward(self, b: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta[b]
        )  # (b, hidden)

    def run(self, step: StaticStep, pending, last_sampled) -> torch.Tensor:
        """The hidden states (num, hidden) of the step's real rows."""
        b, w = step.bucket, step.block_table.shape[1]
        self.input_ids[:b].copy_(step.input_ids, non_blocking=True)
        self.positions[:b].copy_(step.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(step.slot_mapping, non_blocking=True)
        self.context_lens[:b].copy_(step.context_lens, non_blocking=True)
        self.block_table[:b, :w].copy_(step.block_table, non_blocking=True)
        if pending is not None:
            at, rows = (t.to(self.device, non_blocking=True) for t in pending)
            self.input_ids[at] = last_sampled[rows]  # the running step's tokens, never via the host
        self.replays += 1
        if b in self.graphs:
            self.graphs[b].replay()
            return self.hidden[b][: step.num]
        return self._forward(b)[: step.num]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """One graph per bucket, largest first, in one memory pool; the buffers hold padding rows, so
        capture writes only the scratch block."""
        pool = None
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: kernels compiled, workspaces allocated, outside the graph
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[b] = self._forward(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch buckets %s", self.buckets)
