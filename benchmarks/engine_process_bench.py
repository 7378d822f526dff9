"""The decoder's engine in a process of its own against the engine on a thread, measured in one run.

(a) ``DecoderCore`` throughput: 16 concurrent greedy requests (mixed prompt and output lengths, no
    early stop) on the `small` tiny checkpoint, with the engine on a thread of the caller's process
    (``engine_process: false``) and in its own process (the default), in interleaved rounds. Each mode
    runs twice: with an idle event loop, and beside a busy one — a task that holds the GIL for
    ``--busy-ms`` of every ``--period-ms`` (JSON encoding, standing in for the gRPC, protobuf and
    HTTP work of other requests in a replica). Reported: generated tokens per wall second (medians
    over rounds), the ratio process / thread, and each mode's start-up time. Both modes must produce
    the same tokens; the run checks it. Beside wall time, tokens per CPU second of both processes
    (what the pipe and the second interpreter cost; the busy loop's own CPU counts too).
(b) One image's embeddings handed to another process and read there: through torch's shared memory
    (what ``AddRequest`` does: the storage is copied once, into shared memory, and mapped by the
    engine process) against the tensor's raw bytes through the same pipe (copied out, through the
    kernel, and into a new tensor). Milliseconds per hand-over, medians.

    python benchmarks/engine_process_bench.py [--threads 1] [--rounds 3] [--out benchmarks/results/engine_process.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp

from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
from services.decoder.engine.async_engine import DecoderCore
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import GenerateInput

NUM_REQUESTS = 16
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
PAYLOAD = {"choices": [{"delta": {"content": "token " * 8}, "index": i} for i in range(64)]}


def workload(seed: int = 0) -> list[tuple[int, int]]:
    """(prompt words, output tokens) per request."""
    rng = random.Random(seed)
    return [(rng.choice([24, 48, 96, 192]), rng.choice([32, 64, 96])) for _ in range(NUM_REQUESTS)]


def inputs(work, tag: str) -> list[GenerateInput]:
    return [
        GenerateInput(
            f"{tag}-{i}",
            [{"role": "user", "content": [{"type": "text", "text": "word " * words}]}],
            images=[],
            sampling=GREEDY,
            max_tokens=out,
        )
        for i, (words, out) in enumerate(work)
    ]


async def _hog(stop: asyncio.Event, busy_s: float, period_s: float) -> None:
    """Hold the GIL for ``busy_s`` of every ``period_s``, as request handling in the replica would."""
    while not stop.is_set():
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            json.dumps(PAYLOAD)
        await asyncio.sleep(period_s - busy_s)


async def _run(core: DecoderCore, batch: list[GenerateInput], busy: tuple[float, float] | None):
    async def one(inp):
        return [t async for e in core.generate(inp) for t in e.token_ids]

    stop = asyncio.Event()
    hog = asyncio.create_task(_hog(stop, *busy)) if busy else None
    cpu, start = _cpu_seconds(core), time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in batch))
    wall, cpu = time.perf_counter() - start, _cpu_seconds(core) - cpu
    stop.set()
    if hog is not None:
        await hog
    produced = sum(len(t) for t in tokens)
    out = {"tokens": produced, "seconds": wall, "tokens_per_s": produced / wall, "cpu_seconds": cpu}
    return out, tokens


def _cpu_seconds(core: DecoderCore) -> float:
    """CPU time of this process and of the engine's (a busy loop's own work included)."""
    procs = [psutil.Process()] + ([psutil.Process(core.engine_pid)] if core.engine_pid else [])
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def bench_cores(ckpt: Path, rounds: int, busy: tuple[float, float]) -> dict:
    work = workload()
    cores, startup = {}, {}
    for mode in ("thread", "process"):
        config = DecoderConfig(
            model=str(ckpt),
            cache=CacheConfig(num_blocks=1024, block_size=16, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=32),
            engine_process=mode == "process",
        )
        start = time.perf_counter()
        cores[mode] = DecoderCore(config)
        startup[mode] = time.perf_counter() - start
    runs: dict[str, list[dict]] = {}
    seen: dict[str, list[list[int]]] = {}
    try:
        for mode in cores:  # warm-up
            asyncio.run(_run(cores[mode], inputs(work, f"warm-{mode}"), None))
        for r in range(rounds):
            for loop in ("idle", "busy"):
                for mode in ("thread", "process")[:: 1 if r % 2 == 0 else -1]:  # a pair, back to back
                    name = f"{mode}_{loop}_loop"
                    batch = inputs(work, f"{name}-{r}")
                    out, tokens = asyncio.run(_run(cores[mode], batch, busy if loop == "busy" else None))
                    runs.setdefault(name, []).append(out)
                    assert tokens == seen.setdefault(mode, tokens), "greedy tokens changed between rounds"
                    print(f"round {r} {name}", out, flush=True)
    finally:
        for core in cores.values():
            core.shutdown()
    medians = {n: statistics.median(o["tokens_per_s"] for o in outs) for n, outs in runs.items()}
    cpu = {n: statistics.median(o["tokens"] / o["cpu_seconds"] for o in outs) for n, outs in runs.items()}

    def ratio(loop: str) -> float:
        """Median over rounds of process / thread, each round's pair measured back to back."""
        pairs = zip(runs[f"process_{loop}_loop"], runs[f"thread_{loop}_loop"], strict=True)
        return statistics.median(p["tokens_per_s"] / t["tokens_per_s"] for p, t in pairs)

    return {
        "tokens_per_s": medians,
        "tokens_per_cpu_s": cpu,
        "process_over_thread": {"idle_loop": ratio("idle"), "busy_loop": ratio("busy")},
        "startup_s": startup,
        "identical_tokens": seen["thread"] == seen["process"],
        "rounds": runs,
        "requests": [{"prompt_words": w, "output_tokens": n} for w, n in work],
    }


# -- (b) handing an image's embeddings over -------------------------------------------------------
def _reader(conn) -> None:
    while (msg := conn.recv()) is not None:
        if isinstance(msg, tuple):  # raw bytes: dtype, shape, data
            dtype, shape, data = msg
            t = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        else:
            t = msg
        conn.send(float(t.sum()))  # read every byte where the engine would


def bench_handover(repeats: int = 15) -> dict:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_reader, args=(there,), daemon=True)
    proc.start()
    results = {}
    try:
        for name, (rows, hidden, dtype) in {
            "1_tile_896_float32": (256, 896, torch.float32),
            "13_tiles_896_bfloat16": (13 * 256, 896, torch.bfloat16),
            "13_tiles_4096_bfloat16": (13 * 256, 4096, torch.bfloat16),
        }.items():
            times: dict[str, list[float]] = {"shared_memory_ms": [], "raw_bytes_ms": []}
            for _ in range(repeats):
                for how in times:
                    t = torch.randn(rows, hidden).to(dtype)  # a fresh tensor, as each request's is
                    start = time.perf_counter()
                    if how == "shared_memory_ms":
                        here.send(t)
                    else:
                        here.send((dtype, tuple(t.shape), t.view(torch.uint8).numpy().tobytes()))
                    here.recv()
                    times[how].append((time.perf_counter() - start) * 1e3)
            nbytes = rows * hidden * torch.empty((), dtype=dtype).element_size()
            results[name] = {"mib": nbytes / 2**20, **{k: statistics.median(v) for k, v in times.items()}}
            print(name, results[name], flush=True)
    finally:
        here.send(None)
        proc.join(10)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_process.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy-ms", type=float, default=10.0)
    ap.add_argument("--period-ms", type=float, default=20.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the engine process takes its parent's count
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "small", preset="small", llm="qwen2")
        results = {"handover": bench_handover()}
        results["cores"] = bench_cores(ckpt, args.rounds, (args.busy_ms / 1e3, args.period_ms / 1e3))
    results["setup"] = {
        "checkpoint": "tiny_checkpoint preset=small llm=qwen2",
        "busy_loop": f"{args.busy_ms} ms of every {args.period_ms} ms",
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    keys = ("tokens_per_s", "tokens_per_cpu_s", "process_over_thread", "startup_s")
    print(json.dumps({k: results["cores"][k] for k in keys}))


if __name__ == "__main__":
    main()
