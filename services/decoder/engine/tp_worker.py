"""Tensor parallelism: one process per rank, driven by rank 0.

The driver (rank 0) lives in the engine's process; ranks 1..N-1 are processes it spawns with
``torch.multiprocessing``. All ranks join one ``torch.distributed`` group (NCCL on CUDA, gloo on
CPU) for the layers' all_reduce, plus a gloo group for control: every step the driver broadcasts
``(method, args)`` and every rank runs the same method, so all ranks execute the same forward in
lockstep. Only rank 0 computes logits and samples.

What crosses the process boundary each step is a ``StepDelta``, not the flat batch: each chunk's
own tokens and image rows (data that crosses once per computation anyway), and of its block table
only what changed since the ranks last saw it. The ranks keep the tables (``TableMirror``) and
rebuild the same ``StepInput`` the driver runs; ended requests are named once so they drop them.

A rank exits with its driver, even one killed outright (``services.common.lifeline``): the driver is
built on a thread that lives as long as the engine (the engine process's main thread, or the thread
that builds ``DecoderCore`` with the engine on a thread).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.lifeline import exit_with_parent
from services.decoder.config import DecoderConfig
from services.decoder.engine.model_runner import ChunkWork, Launched, ModelRunner, chunk_work
from services.decoder.engine.sampler import SamplerOutput
from services.decoder.engine.scheduler import ScheduledChunk
from services.decoder.models.layers import TPContext


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ChunkDelta:
    """One chunk for the other ranks: its work, and its block table as an edit of the last one sent."""

    request_id: str
    work: ChunkWork
    keep_blocks: int  # leading entries of the ranks' copy of the table that are still valid
    new_blocks: list[int]  # appended after those


@dataclass
class StepDelta:
    chunks: list[ChunkDelta]
    released: list[str] = field(default_factory=list)  # ended requests: forget their tables


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class DeltaEncoder:
    """Driver side: remembers the tables the ranks hold and sends each step only the changes.

    A table usually only grows (a decode crosses into a new block); after preemption it is rebuilt,
    which the common-prefix edit covers without a special case.
    """

    def __init__(self):
        self.sent: dict[str, list[int]] = {}
        self.released: list[str] = []

    def release(self, request_id: str) -> None:
        if self.sent.pop(request_id, None) is not None:
            self.released.append(request_id)

    def encode(self, chunks: list[ScheduledChunk]) -> StepDelta:
        out = []
        for ch in chunks:
            rid, table = ch.request.request_id, ch.request.block_ids
            known = self.sent.get(rid, [])
            keep = _common_prefix(known, table)
            out.append(ChunkDelta(rid, chunk_work(ch), keep, table[keep:]))
            self.sent[rid] = list(table)
        delta = StepDelta(out, self.released)
        self.released = []
        return delta


class TableMirror:
    """Rank side: the block tables the driver sent, edited by each step's delta."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}

    def apply(self, delta: StepDelta) -> tuple[list[ChunkWork], list[list[int]]]:
        for rid in delta.released:
            self.tables.pop(rid, None)
        items, tables = [], []
        for ch in delta.chunks:
            table = self.tables.setdefault(ch.request_id, [])
            del table[ch.keep_blocks :]
            table += ch.new_blocks
            items.append(ch.work)
            tables.append(table)
        return items, tables


class _Follower:
    """What ranks 1..N-1 run for each broadcast method."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.mirror = TableMirror()

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_cache(num_blocks)

    def step(self, delta: StepDelta) -> None:
        self.runner.execute(self.runner.build_step(*self.mirror.apply(delta)))


def _backend(config: DecoderConfig) -> str:
    if config.parallel.backend != "auto":
        return config.parallel.backend
    return "nccl" if config.device == "cuda" else "gloo"


def _init_group(config: DecoderConfig, rank: int, port: int) -> tuple[TPContext, Any]:
    world = config.parallel.tensor_parallel_size
    backend = _backend(config)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{config.parallel.master_addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=config.parallel.start_timeout_s),
    )
    group = dist.group.WORLD
    control = group if backend == "gloo" else dist.new_group(backend="gloo")
    return TPContext(rank=rank, size=world, group=group), control


def worker_main(config_json: str, rank: int, port: int, threads: int, driver_pid: int) -> None:
    """Entry point of ranks 1..N-1: build the shard, then run whatever the driver broadcasts."""
    exit_with_parent(driver_pid)  # a driver killed outright takes its ranks with it
    torch.set_num_threads(threads)
    config = DecoderConfig.model_validate_json(config_json)
    tp, control = _init_group(config, rank, port)
    follower = _Follower(ModelRunner(config, tp))
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            method, args = box[0]
            if method == "exit":
                break
            getattr(follower, method)(*args)
    finally:
        dist.destroy_process_group()


class TPDriver:
    """Rank 0: the same interface as a single ``ModelRunner`` step, fanned out to every rank."""

    def __init__(self, config: DecoderConfig):
        world = config.parallel.tensor_parallel_size
        port = config.parallel.master_port or free_port(config.parallel.master_addr)
        threads = max(1, (os.cpu_count() or 1) // world)
        ctx = mp.get_context("spawn")
        payload = config.model_dump_json()
        self.procs = [
            ctx.Process(target=worker_main, args=(payload, r, port, threads, os.getpid()), daemon=True)
            for r in range(1, world)
        ]
        for p in self.procs:
            p.start()
        try:
            tp, self.control = _init_group(config, 0, port)
            self.runner = ModelRunner(config, tp)
        except BaseException:
            self._kill()
            raise
        self.encoder = DeltaEncoder()
        self.closed = False

    def _call(self, method: str, *args) -> None:
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)

    def init_cache(self, num_blocks: int) -> None:
        self._call("init_cache", num_blocks)
        self.runner.init_cache(num_blocks)

    def step(self, chunks: list[ScheduledChunk]) -> SamplerOutput | None:
        delta = self.encoder.encode(chunks)
        self._call("step", delta)
        items = [ch.work for ch in delta.chunks]
        logits = self.runner.execute(self.runner.build_step(items, [ch.request.block_ids for ch in chunks]))
        return None if logits is None else self.runner.sample(logits, chunks)

    def launch(self, chunks: list[ScheduledChunk]) -> Launched:
        """``step``, done on return: the ranks run in lockstep, so tensor parallelism runs in series."""
        return Launched(output=self.step(chunks))

    def release(self, request_id: str) -> None:
        """The request ended: its sampler state goes now, the ranks' table with the next step."""
        self.runner.sampler.release(request_id)
        self.encoder.release(request_id)

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._call("exit")
        except Exception:
            pass
        for p in self.procs:
            p.join(timeout=10)
        self._kill()
        if dist.is_initialized():
            dist.destroy_process_group()
