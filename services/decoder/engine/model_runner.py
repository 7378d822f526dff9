"""The model runner: owns the weights, the paged KV cache and the sampler of one rank.

Rank 0 (the driver) turns a ``SchedulerOutput`` into a ``StepInput`` of flat tensors, runs its shard
of the forward, computes logits and samples. Other ranks only run the forward (each layer's
all_reduce combines the shards); they build the same ``StepInput`` from what ``tp_worker`` sends them.

Loading: the model is allocated on the rank's device (``build_model``), then each weight's own
slice is read from the safetensors files and copied into it in place, so a rank's host memory never
holds more than one weight's shard (``bytes_read`` counts what the rank read).

KV sizing: ``CacheConfig.num_blocks`` when given; otherwise the share ``memory_fraction`` of the
device's memory, less what is in use once the weights are loaded (on a GPU: measured, so nothing is
counted twice; on the CPU: the weights), an activation reserve and the sampler's (``BYTES_PER_LOGIT``
per vocabulary entry of ``max_num_seqs`` rows), capped at what ``max_num_seqs`` sequences of
``max_model_len`` tokens could ever use. Too little for one full-length sequence is a
start-up error that names the knobs.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.checkpoint import Checkpoint, SliceReader
from services.common.errors import FailedPrecondition
from services.decoder.attention.registry import AttentionBackend, AttentionMetadata, get_backend
from services.decoder.config import DecoderConfig
from services.decoder.engine.decode_graphs import DecodeGraphs, StaticStep
from services.decoder.engine.sampler import BYTES_PER_LOGIT, DeviceSample, Sampler, SamplerOutput, SampleRow
from services.decoder.engine.scheduler import ScheduledChunk
from services.decoder.models.decoder_lm import DecoderLM, build_model, check_tp_split
from services.decoder.models.layers import TPContext
from services.decoder.models.registry import Family, ModelSpec, get_family

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepInput:
    """One step's flat batch, on CPU; every rank builds its own (``ModelRunner.build_step``)."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64
    query_start_loc: list[int]  # B + 1
    context_lens: list[int]  # B
    block_tables: list[list[int]]  # B
    logits_indices: torch.Tensor  # (S,) flat index of each sampling request's last token
    image_rows: torch.Tensor | None  # (R, hidden)
    image_index: torch.Tensor | None  # (R,) flat token index each row replaces
    # tokens sampled by the step still running (overlapped scheduling): (flat index, row of that
    # step's sampled ids) pairs, filled in on the device before the forward
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    # the step padded to a batch bucket for the static decode path (``compile.cuda_graphs``), or None
    static: StaticStep | None = None


@dataclass
class ChunkWork:
    """One scheduled chunk as the forward needs it, without the request around it.

    ``token_ids`` are the chunk's input tokens at positions ``start..start+len-1``; ``image_rows``
    (r, hidden) replace the tokens at the chunk-relative positions ``image_index``.
    """

    start: int
    token_ids: list[int]
    sample: bool
    image_rows: torch.Tensor | None = None
    image_index: list[int] = field(default_factory=list)
    pending_row: int | None = None  # the last token is a placeholder: row of the running step's sample


def chunk_work(ch: ScheduledChunk, pending_rows: dict[str, int] | None = None) -> ChunkWork:
    """The chunk's work; ``pending_rows`` maps the requests sampled by the step still running to their
    rows in its sampled ids (their last token is a placeholder until then)."""
    req, s, n = ch.request, ch.start, ch.num_tokens
    rows, index = [], []
    for k, span in enumerate(req.images):
        lo, hi = max(s, span.offset), min(s + n, span.offset + span.length)
        if lo < hi:
            rows.append(req.mm_embeddings[k][lo - span.offset : hi - span.offset])
            index += range(lo - s, hi - s)
    return ChunkWork(
        start=s,
        token_ids=req.all_token_ids[s : s + n],
        sample=ch.sample,
        image_rows=(rows[0] if len(rows) == 1 else torch.cat(rows)) if rows else None,  # (r, hidden)
        image_index=index,
        pending_row=_pending_row(req, s + n, pending_rows),
    )


def _pending_row(req, end: int, pending_rows: dict[str, int] | None) -> int | None:
    if not req.num_pending:
        return None
    if end != req.num_tokens or pending_rows is None or req.request_id not in pending_rows:
        raise RuntimeError(f"{req!r}: its unresolved token is not the last input of the running step")
    return pending_rows[req.request_id]


class Launched:
    """A step handed to the device: ``result`` waits for its sampled ids on the host."""

    def __init__(self, future: Future | None = None, output: SamplerOutput | None = None):
        self.future, self.output = future, output

    def result(self) -> SamplerOutput | None:
        if self.future is not None:
            sample = self.future.result()
            self.future, self.output = None, None if sample is None else sample.result()
        return self.output


def host_tensor(values: list[int], pin: bool) -> torch.Tensor:
    """An int64 host tensor of ``values``; page-locked when ``pin`` (CUDA's copies then do not block)."""
    if not pin:
        return torch.tensor(values, dtype=torch.long)
    out = torch.empty(len(values), dtype=torch.long, pin_memory=True)  # from the caching host allocator
    out.numpy()[:] = values
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_model_len_of(config: DecoderConfig, spec: ModelSpec) -> int:
    """``scheduler.max_model_len``, refused past the longest sequence the model is served exactly for
    (its positions, or fewer where its rope changes with the length); by default that length."""
    bound, why = spec.context_bound()
    wanted = config.scheduler.max_model_len
    if wanted is None:
        if spec.rope.exact_len is not None:
            log.info("scheduler.max_model_len defaults to %d: %s", bound, why)
        return bound
    if wanted > bound:
        raise FailedPrecondition(
            f"scheduler.max_model_len={wanted} exceeds {bound}: {why}; set scheduler.max_model_len <= {bound}"
        )
    return wanted


@dataclass(frozen=True)
class ModelPlan:
    """What a checkpoint's text config and the decoder's settings make of the language model."""

    family: Family
    spec: ModelSpec
    max_model_len: int
    backend: AttentionBackend


def plan_model(config: DecoderConfig, text_config: dict[str, Any]) -> ModelPlan:
    """The model the runner will build, or the ``FailedPrecondition`` / ``InvalidArgument`` that refuses it.

    Reads no weight: the runner calls this first, and ``services.decoder.support`` calls it before
    anything starts, so a checkpoint is refused for the same reason in both places.
    """
    family = get_family(text_config)
    try:
        spec = family.spec(text_config)
    except KeyError as exc:
        raise FailedPrecondition(
            f"the text_config of this checkpoint lacks {exc.args[0]!r}", reason="checkpoint_config_invalid"
        ) from exc
    max_model_len = max_model_len_of(config, spec)
    if spec.sliding_window and max_model_len > spec.sliding_window:
        raise FailedPrecondition(
            f"the model uses a {spec.sliding_window}-token sliding window, which the paged "
            f"backends do not implement: set scheduler.max_model_len <= {spec.sliding_window}"
        )
    check_tp_split(spec, config.parallel.tensor_parallel_size)
    backend = get_backend(config.attention_backend, config.device, config.cache.block_size)
    return ModelPlan(family, spec, max_model_len, backend)


class ModelRunner:
    def __init__(self, config: DecoderConfig, tp: TPContext):
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device if config.device == "cpu" else f"cuda:{tp.rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = DTYPES[config.torch_dtype_name()]
        self.block_size = config.cache.block_size
        checkpoint = Checkpoint.open(config.model)
        plan = plan_model(config, checkpoint.text_config)
        self.family, self.spec, self.max_model_len = plan.family, plan.spec, plan.max_model_len
        self.backend = plan.backend
        self.bytes_read = 0  # the bytes of the checkpoint this rank read: its own shards
        self.model = self._load(checkpoint)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.sampler = Sampler(self.device, seed=config.seed) if tp.rank == 0 else None
        self.last_sampled: torch.Tensor | None = None  # (S,) the last step's sampled ids, on the device
        self.graphs: DecodeGraphs | None = None  # the static decode path, built with the cache

    def _load(self, checkpoint: Checkpoint) -> DecoderLM:
        stored_head = bool(checkpoint.component_keys("lm_head"))  # none stored: tied to the embedding
        with_head = self.tp.rank == 0
        model = build_model(
            self.spec,
            self.tp,
            self.backend,
            with_lm_head=with_head,
            tie_head=not stored_head,
            device=self.device,
            dtype=self.dtype,
        )
        with ExitStack() as files:
            lm = files.enter_context(SliceReader(checkpoint, "language_model"))
            head = (
                files.enter_context(SliceReader(checkpoint, "lm_head")) if with_head and stored_head else None
            )
            model.load_weights(self.family, lm, head)
            self.bytes_read = lm.bytes_read + (head.bytes_read if head is not None else 0)
        log.info(
            "rank %d read %.1f MiB of weights onto %s", self.tp.rank, self.bytes_read / 2**20, self.device
        )
        return model

    # -- KV cache ----------------------------------------------------------------------------------
    @property
    def kv_heads_local(self) -> int:
        return self.spec.num_kv_heads // self.tp.size

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.spec.num_layers * self.block_size * self.kv_heads_local * self.spec.head_dim * elem

    def determine_num_blocks(self) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        min_blocks = _cdiv(self.max_model_len, self.block_size)
        max_useful = sched.max_num_seqs * min_blocks
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
            source = f"cache.num_blocks={cache.num_blocks}"
        else:
            elem = torch.empty((), dtype=self.dtype).element_size()
            s = self.spec
            per_token = elem * (6 * s.hidden_size + 3 * s.intermediate_size // self.tp.size)
            sampling = sched.max_num_seqs * s.vocab_size * BYTES_PER_LOGIT
            reserve = sched.max_num_batched_tokens * per_token + sampling
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # blocks cached by the allocator while loading are free too
                free, total = torch.cuda.mem_get_info(self.device)  # measured after loading: weights in use
                budget = free - total * (1 - cache.memory_fraction) - reserve
            else:
                total = cache.cpu_memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                budget = total * cache.memory_fraction - self.weight_bytes - reserve
            num_blocks = min(max(int(budget // self.bytes_per_block()), 0), max_useful)
            source = (
                f"cache.memory_fraction={cache.memory_fraction} ({int(budget) >> 20} MiB for the KV cache)"
            )
        if num_blocks < min_blocks:
            raise FailedPrecondition(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens ({source}) but one sequence "
                f"of max_model_len={self.max_model_len} tokens needs {min_blocks}: raise cache.memory_fraction or "
                "cache.num_blocks, lower scheduler.max_model_len, or add tensor-parallel ranks",
                reason="kv_cache_too_small",
            )
        return num_blocks

    def init_cache(self, num_blocks: int) -> None:
        """``num_blocks`` for the block manager; with ``compile.cuda_graphs`` one more, the scratch
        block the padding rows of a static decode step write and read."""
        graphs = self.config.compile.cuda_graphs
        shape = (2, num_blocks + int(graphs), self.block_size, self.kv_heads_local, self.spec.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.spec.num_layers)
        ]
        self.num_blocks = num_blocks
        if graphs:
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, self.block_size, self.config.scheduler.max_num_seqs,
                self.max_model_len, self.device, pad_block=num_blocks, capture=self.device.type == "cuda",
            )  # fmt: skip
            if self.device.type == "cuda":
                self.graphs.capture_all()

    # -- a step ------------------------------------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk], pending_rows: dict[str, int] | None = None) -> StepInput:
        return self.build_step(
            [chunk_work(ch, pending_rows) for ch in chunks], [ch.request.block_ids for ch in chunks]
        )

    def build_step(self, items: list[ChunkWork], tables: list[list[int]]) -> StepInput:
        """The flat batch of ``items``, request ``i`` reading and writing the blocks ``tables[i]``.

        Every rank builds its step here, the driver from its requests and the other ranks from what
        the driver sent them (``tp_worker``), so all ranks run the same forward.
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, ctx, logits_idx = [0], [], []
        rows, row_index = [], []
        pending_at, pending_rows = [], []
        for item, table in zip(items, tables, strict=True):
            s, n = item.start, len(item.token_ids)
            base = len(ids)
            ids += item.token_ids
            positions += range(s, s + n)
            slots += [table[p // bs] * bs + p % bs for p in range(s, s + n)]
            qsl.append(base + n)
            ctx.append(s + n)
            if item.sample:
                logits_idx.append(base + n - 1)
            if item.image_rows is not None:
                rows.append(item.image_rows)
                row_index += [base + i for i in item.image_index]
            if item.pending_row is not None:
                pending_at.append(base + n - 1)
                pending_rows.append(item.pending_row)
        pin = self.device.type == "cuda"
        static = None
        if self.graphs is not None and all(
            len(it.token_ids) == 1 and it.sample and it.image_rows is None for it in items
        ):
            static = self.graphs.stage(ids, positions, slots, ctx, list(tables), pin)
        return StepInput(
            input_ids=host_tensor(ids, pin),
            positions=host_tensor(positions, pin),
            slot_mapping=host_tensor(slots, pin),
            query_start_loc=qsl,
            context_lens=ctx,
            block_tables=list(tables),
            logits_indices=host_tensor(logits_idx, pin),
            image_rows=torch.cat(rows).to(self.dtype) if rows else None,  # (R, hidden)
            image_index=torch.tensor(row_index, dtype=torch.long) if rows else None,
            pending=(host_tensor(pending_at, pin), host_tensor(pending_rows, pin)) if pending_at else None,
            static=static,
        )

    def metadata(self, step: StepInput) -> AttentionMetadata:
        """The attention backend's view of the step (host work: under overlap, while a step runs)."""
        if step.static is not None:
            return self.graphs.meta(step.static)  # the bucket's static buffers: nothing to build
        meta = AttentionMetadata(
            slot_mapping=step.slot_mapping.to(self.device, non_blocking=True),
            query_start_loc=step.query_start_loc,
            context_lens=step.context_lens,
            block_tables=step.block_tables,
            block_size=self.block_size,
        )
        self.backend.prepare(meta, self.device)
        return meta

    def execute(self, step: StepInput, meta: AttentionMetadata | None = None) -> torch.Tensor | None:
        """Run the forward on this rank; rank 0 returns the logits (S, vocab) of the sampling rows."""
        dev = self.device
        if step.static is not None:
            hidden = self.graphs.run(step.static, step.pending, self.last_sampled)  # (S, hidden)
            return self.model.compute_logits(hidden)  # (S, vocab)
        meta = self.metadata(step) if meta is None else meta
        input_ids = step.input_ids.to(dev, non_blocking=True)
        if step.pending is not None:
            at, rows = (t.to(dev, non_blocking=True) for t in step.pending)
            input_ids[at] = self.last_sampled[rows]  # the running step's tokens, never via the host
        hidden = self.model(
            input_ids,
            step.positions.to(dev, non_blocking=True),
            self.kv_caches,
            meta,
            image_rows=None if step.image_rows is None else step.image_rows.to(dev, non_blocking=True),
            image_index=None if step.image_index is None else step.image_index.to(dev, non_blocking=True),
        )  # (T, hidden)
        if self.tp.rank != 0 or step.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden[step.logits_indices.to(dev, non_blocking=True)])  # (S, vocab)

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> SamplerOutput:
        return self.sampler(logits, [c.request for c in chunks if c.sample])

    @torch.inference_mode()
    def run(self, step: StepInput, meta: AttentionMetadata, rows: list[SampleRow]) -> DeviceSample | None:
        """Forward and sampling of a launched step (the device worker's job); the sampled ids stay on
        the device for the next step's placeholders, and start their copy to the host."""
        logits = self.execute(step, meta)
        if logits is None:
            return None
        sample = self.sampler.sample(logits, rows)
        self.last_sampled = sample.tokens
        sample.to_host()
        return sample
