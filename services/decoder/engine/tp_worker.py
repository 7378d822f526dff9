"""Tensor parallelism: one process per rank, driven by rank 0.

The driver (rank 0) lives in the engine's process; ranks 1..N-1 are processes it spawns with
``torch.multiprocessing``. All ranks join one ``torch.distributed`` group (NCCL on CUDA, gloo on
CPU) for the layers' all_reduce, plus a gloo group for control: every step the driver broadcasts
``(method, args)`` and every rank runs the same method, so all ranks execute the same forward in
lockstep. Only rank 0 computes logits and samples.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.decoder.config import DecoderConfig
from services.decoder.engine.model_runner import ModelRunner, StepInput
from services.decoder.engine.sampler import SamplerOutput
from services.decoder.engine.scheduler import ScheduledChunk
from services.decoder.models.layers import TPContext


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def worker_main(config_json: str, rank: int, port: int, threads: int) -> None:
    """Entry point of ranks 1..N-1: build the shard, then run whatever the driver broadcasts."""
    torch.set_num_threads(threads)
    config = DecoderConfig.model_validate_json(config_json)
    tp, control = _init_group(config, rank, port)
    runner = ModelRunner(config, tp)
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            method, args = box[0]
            if method == "exit":
                break
            getattr(runner, method)(*args)
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
            ctx.Process(target=worker_main, args=(payload, r, port, threads), daemon=True)
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
        self.closed = False

    def _call(self, method: str, *args) -> None:
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)

    def init_cache(self, num_blocks: int) -> None:
        self._call("init_cache", num_blocks)
        self.runner.init_cache(num_blocks)

    def step(self, chunks: list[ScheduledChunk]) -> SamplerOutput | None:
        step: StepInput = self.runner.prepare(chunks)
        self._call("execute", step)
        logits = self.runner.execute(step)
        return None if logits is None else self.runner.sample(logits, chunks)

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
