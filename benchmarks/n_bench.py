"""``n`` = 4 against four separate requests of the same prompt, on the CPU (the `small` tiny checkpoint).

One chat request with an image of 2 tiles (512 image tokens) and a question, 48 generated tokens per
choice (sampled, seeded, ``ignore_eos`` so every choice runs to the end). Two ways to get four answers,
each run on the engine from an idle start, in interleaved rounds:

- ``n4``: one request with ``n`` = 4: the four samples of ``services.decoder.samples.sample_inputs``, one
  prefix group, so the scheduler prefills the prompt once and the others take its blocks from the
  prefix cache (``engine.siblings``);
- ``separate``: four requests of the same prompt sent together, as a client without ``n`` would: each
  prefills the prompt (they arrive in the same step, before any of them has cached it).

Each round uses a fresh cache namespace, so no round finds another's blocks. Reported: generated tokens
per second of wall time and of CPU time (``time.process_time``: the machine may be shared), their
medians and ratios (target: tokens/s of ``n4`` >= 1.5x ``separate``), the prompt tokens computed and the
prefix-cache hits (the block manager's own counters).

    python benchmarks/n_bench.py [--checkpoint DIR] [--rounds 3] [--threads 1] [--out benchmarks/results/n.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.samples import sample_inputs
from services.decoder.types import GenerateInput, ImageEmbedding

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.engine_common import machine, write_results  # noqa: E402

N = 4
TILES = 2
OUTPUT_TOKENS = 48
QUESTION = "Describe everything you can see in this picture, then say what might happen next."


def make_engine(ckpt: Path) -> LLMEngine:
    return LLMEngine(
        DecoderConfig(
            model=str(ckpt),
            dtype="float32",
            cache=CacheConfig(num_blocks=512, block_size=16),
            scheduler=SchedulerConfig(max_model_len=2048, max_num_batched_tokens=2048),
        )
    )


def inputs(engine: LLMEngine, mode: str, namespace: str) -> list[GenerateInput]:
    hidden = engine.executor.runner.spec.hidden_size
    g = torch.Generator().manual_seed(1)
    image = ImageEmbedding(torch.randn(TILES * 256, hidden, generator=g), TILES, "bench-image")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]

    def one(request_id: str, seed: int) -> GenerateInput:
        sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
        return GenerateInput(
            request_id, messages, [image], sampling, OUTPUT_TOKENS, cache_namespace=namespace
        )

    if mode == "n4":
        return sample_inputs(one(f"{namespace}-n", 7), N)
    return [one(f"{namespace}-{k}", 7 + k) for k in range(N)]


def run_once(engine: LLMEngine, mode: str, namespace: str) -> dict:
    bm, sched = engine.block_manager, engine.scheduler
    hits0, tokens0 = bm.prefix_hits, sum(sched.policy.tokens.values())
    batch = inputs(engine, mode, namespace)
    wall, cpu = time.perf_counter(), time.process_time()
    for inp in batch:
        engine.add_request(engine.make_request(inp))
    generated = 0
    while engine.has_unfinished:
        generated += sum(len(e.token_ids) for e in engine.step())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "generated_tokens": generated,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": generated / wall,
        "tokens_per_cpu_s": generated / cpu,
        "tokens_computed": sum(sched.policy.tokens.values()) - tokens0,
        "prefix_hit_tokens": bm.prefix_hits - hits0,
    }


def bench(ckpt: Path, rounds: int) -> dict:
    engine = make_engine(ckpt)
    try:
        run_once(engine, "n4", "warmup-a")
        run_once(engine, "separate", "warmup-b")
        runs: dict[str, list[dict]] = {"n4": [], "separate": []}
        for r in range(rounds):
            for mode in ("n4", "separate") if r % 2 == 0 else ("separate", "n4"):
                runs[mode].append(run_once(engine, mode, f"round{r}-{mode}"))
        prompt_tokens = len(engine.make_request(inputs(engine, "separate", "probe")[0]).prompt_token_ids)
    finally:
        engine.shutdown()
    medians = {
        mode: {key: statistics.median(run[key] for run in rs) for key in rs[0]} for mode, rs in runs.items()
    }
    return {
        "runs": runs,
        "medians": medians,
        "prompt_tokens": prompt_tokens,
        "ratio_tokens_per_s": medians["n4"]["tokens_per_s"] / medians["separate"]["tokens_per_s"],
        "ratio_tokens_per_cpu_s": medians["n4"]["tokens_per_cpu_s"] / medians["separate"]["tokens_per_cpu_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: a fresh `small` tiny checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/n.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = make_tiny_checkpoint(Path(tmp.name) / "small", preset="small", llm="qwen2")
    results = bench(ckpt, args.rounds)
    results["target"] = {"ratio_tokens_per_s_min": 1.5}
    results["setup"] = machine(
        checkpoint=str(args.checkpoint) if args.checkpoint else "tiny_checkpoint preset=small llm=qwen2",
        n=N,
        image_tiles=TILES,
        output_tokens_per_choice=OUTPUT_TOKENS,
        block_size=16,
        max_num_batched_tokens=2048,
        device="cpu",
        rounds=args.rounds,
    )
    write_results(args.out, results)
    m = results["medians"]
    for mode in ("n4", "separate"):
        print(
            f"{mode:9s} {m[mode]['tokens_per_s']:7.1f} tok/s  {m[mode]['tokens_per_cpu_s']:7.1f} tok/CPU-s  "
            f"computed {m[mode]['tokens_computed']:.0f}  prefix hits {m[mode]['prefix_hit_tokens']:.0f}"
        )
    print(
        f"prompt {results['prompt_tokens']} tokens; n=4 / separate: tokens/s {results['ratio_tokens_per_s']:.2f}x, "
        f"per CPU second {results['ratio_tokens_per_cpu_s']:.2f}x"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
