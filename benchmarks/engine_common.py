"""What the engine benchmarks share: a clock for a block, the engine they drive, its prompts, and how
a result file records the machine it was measured on."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/<name>.py`` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.common.checkpoint import Checkpoint  # noqa: E402
from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig  # noqa: E402
from services.decoder.engine.llm_engine import LLMEngine  # noqa: E402


class Meter:
    """Wall and process CPU time (all threads) of a block: on a shared machine the wall clock moves
    with other people's load; CPU time says what the work itself cost."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def make_bench_engine(ckpt_dir: Path, num_blocks: int = 512, **scheduler: Any) -> LLMEngine:
    """The engine the benchmarks drive: no prefix cache (every run computes everything), 1024 tokens."""
    cfg = DecoderConfig(
        model=str(ckpt_dir),
        cache=CacheConfig(num_blocks=num_blocks, block_size=16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=32, **scheduler
        ),
    )
    return LLMEngine(cfg)


def random_prompts(ckpt_dir: Path, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids drawn from the checkpoint's vocabulary."""
    rng = random.Random(seed)
    vocab = int(Checkpoint.open(ckpt_dir).text_config["vocab_size"])
    return [[rng.randrange(20, vocab) for _ in range(length)] for _ in range(count)]


def machine(**setup: Any) -> dict[str, Any]:
    """``setup`` and what the figures depend on: torch, its threads, the CPU, the machine's load."""
    return {
        **setup,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
