"""Sampling cost at batch 16 on the CPU: sampled decoding against greedy decoding, measured in one run.

(a) The engine: 16 requests (64-token prompts, 64 generated tokens, no early stop) on the `small` tiny
    checkpoint, greedy against temperature 0.8 / top-p 0.9, in interleaved rounds. Reported: generated
    tokens per CPU second of the whole run, and the median CPU time of a step where all 16 decode; the
    ratio sampled / greedy is the figure to watch (target >= 0.9).
(b) The sampler alone on random logits over a real vocabulary (151,936 tokens, Qwen2's) and over the
    checkpoint's: the CPU time of one batch-16 sampling step for each mode (greedy, temperature,
    top-p, top-k, seeded, penalties over 512-token contexts, logprobs), as tokens per CPU second.

The machine may be shared: CPU time (``time.process_time``) is what the work cost; wall time is reported
beside it.

    python benchmarks/sampler_bench.py [--threads 1] [--rounds 3] [--out benchmarks/results/sampler.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from services.common.checkpoint import Checkpoint
from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.decoder.engine.request import Request
from services.decoder.engine.sampler import Sampler
from services.decoder.engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.engine_common import Meter, machine, make_bench_engine, random_prompts, write_results  # noqa: E402

BATCH = 16
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 64
QWEN2_VOCAB = 151_936

ENGINE_MODES = {
    "greedy": SamplingParams(temperature=0.0, ignore_eos=True),
    "temperature_0.8_top_p_0.9": SamplingParams(temperature=0.8, top_p=0.9, ignore_eos=True),
}

SAMPLER_MODES = {
    "greedy": dict(temperature=0.0),
    "temperature_0.8": dict(temperature=0.8),
    "temperature_0.8_top_p_0.9": dict(temperature=0.8, top_p=0.9),
    "top_k_50": dict(temperature=0.8, top_k=50),
    "seeded_temperature_0.8_top_p_0.9": dict(temperature=0.8, top_p=0.9, seed=1),
    "penalties_greedy": dict(
        temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5
    ),
    "logprobs_5_greedy": dict(temperature=0.0, logprobs=5),
    "mixed": None,  # a quarter each: greedy, top-p, seeded top-p, top-k with penalties
}


class EngineRun:
    """One engine, warmed once; each ``run(mode)`` submits the 16 requests again."""

    def __init__(self, ckpt_dir: Path):
        self.eng = make_bench_engine(ckpt_dir)
        self.prompts = random_prompts(ckpt_dir, BATCH, PROMPT_TOKENS)
        self.runs = 0
        for mode in ENGINE_MODES:
            self.run(mode)  # warm-up

    def run(self, mode: str) -> dict:
        eng, params = self.eng, ENGINE_MODES[mode]
        self.runs += 1
        for i, ids in enumerate(self.prompts):
            eng.add_request(
                Request(
                    f"{mode}-{self.runs}-{i}", ids, params, OUTPUT_TOKENS, eos_token_ids=eng.eos_token_ids
                )
            )
        runner = eng.executor.runner
        sample = runner.sample
        sampling: list[float] = []

        def timed_sample(*args):  # the sampler's own CPU time within each step
            c = time.process_time()
            try:
                return sample(*args)
            finally:
                sampling.append(time.process_time() - c)

        runner.sample = timed_sample
        produced, steps, step_sampling = 0, [], []
        with Meter() as total:
            while eng.has_unfinished:
                n_running = eng.scheduler.num_running()
                sampling.clear()
                with Meter() as m:
                    events = eng.step()
                produced += sum(len(e.token_ids) for e in events)
                if n_running == BATCH and len(events) == BATCH and all(len(e.token_ids) == 1 for e in events):
                    steps.append(m)
                    step_sampling.append(sum(sampling))
        runner.sample = sample
        return {
            "tokens": produced,
            "cpu_seconds": total.cpu,
            "seconds": total.wall,
            "tokens_per_cpu_s": produced / total.cpu,
            "tokens_per_s": produced / total.wall,
            "decode_step_cpu_ms_batch16": statistics.median(s.cpu for s in steps) * 1e3,
            "sample_cpu_ms_per_decode_step": statistics.median(step_sampling) * 1e3,
            "decode_steps_measured": len(steps),
        }


def _params(mode: str, row: int) -> SamplingParams:
    spec = SAMPLER_MODES[mode]
    if spec is None:
        spec = [
            dict(temperature=0.0),
            dict(temperature=0.8, top_p=0.9),
            dict(temperature=0.8, top_p=0.9, seed=row),
            dict(temperature=0.8, top_k=50, repetition_penalty=1.1, frequency_penalty=0.5),
        ][row % 4]
    return SamplingParams(**spec)


def sampler_alone(vocab: int, mode: str, steps: int = 20) -> dict:
    """CPU time of one batch-16 sampling step (median over ``steps``); each step appends the sampled
    tokens to the requests, as the scheduler does, so penalties see growing contexts."""
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    sampler = Sampler(torch.device("cpu"), seed=0)
    reqs = [
        Request(f"{mode}-{i}", [rng.randrange(vocab) for _ in range(512)], _params(mode, i), steps + 1)
        for i in range(BATCH)
    ]
    logits = [torch.randn(BATCH, vocab, generator=gen) * 3 for _ in range(4)]
    times = []
    for s in range(steps + 2):
        batch = logits[s % len(logits)].clone()
        with Meter() as m:
            out = sampler(batch, reqs)
        for req, tok in zip(reqs, out.token_ids, strict=True):
            req.append_output_token(tok)
        if s >= 2:  # the first two warm the sampler's buffers
            times.append(m)
    for req in reqs:
        sampler.release(req.request_id)
    cpu_ms = statistics.median(t.cpu for t in times) * 1e3
    return {
        "step_cpu_ms": cpu_ms,
        "step_ms": statistics.median(t.wall for t in times) * 1e3,
        "tokens_per_cpu_s": BATCH / cpu_ms * 1e3,
    }


def bench_engine(ckpt: Path, rounds: int) -> dict:
    engine = EngineRun(ckpt)
    names = list(ENGINE_MODES)
    per_round: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:  # alternate which mode runs first
            per_round[name].append(engine.run(name))
            print(f"engine round {r} {name}", per_round[name][-1], flush=True)
    engine.eng.shutdown()
    sampled, greedy = per_round["temperature_0.8_top_p_0.9"], per_round["greedy"]
    return {
        "medians": {
            n: {k: statistics.median(r[k] for r in per_round[n]) for k in per_round[n][0]} for n in names
        },
        "ratio_sampled_vs_greedy_tokens_per_cpu_s": statistics.median(
            s["tokens_per_cpu_s"] / g["tokens_per_cpu_s"] for s, g in zip(sampled, greedy, strict=True)
        ),
        "ratio_sampled_vs_greedy_decode_step_cpu": statistics.median(
            g["decode_step_cpu_ms_batch16"] / s["decode_step_cpu_ms_batch16"]
            for s, g in zip(sampled, greedy, strict=True)
        ),
        "rounds": per_round,
    }


def bench_sampler(vocabs: list[int]) -> dict:
    out = {}
    for vocab in vocabs:
        modes = {mode: sampler_alone(vocab, mode) for mode in SAMPLER_MODES}
        greedy = modes["greedy"]["tokens_per_cpu_s"]
        for mode, figures in modes.items():
            figures["ratio_vs_greedy"] = figures["tokens_per_cpu_s"] / greedy
            print(f"sampler vocab={vocab} {mode}", figures, flush=True)
        out[f"vocab_{vocab}"] = modes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: a fresh `small` tiny checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sampler.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-engine", action="store_true", help="only the sampler alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = make_tiny_checkpoint(Path(tmp.name) / "small", preset="small", llm="qwen2")
    vocab = int(Checkpoint.open(ckpt).text_config["vocab_size"])
    results = {}
    if not args.skip_engine:
        results["engine"] = bench_engine(ckpt, args.rounds)
    results["sampler_alone"] = bench_sampler([vocab, QWEN2_VOCAB])
    results["target"] = {"engine_sampled_vs_greedy_min": 0.9}
    results["setup"] = machine(
        checkpoint="tiny_checkpoint preset=small llm=qwen2",
        batch=BATCH,
        prompt_tokens=PROMPT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        dtype="float32",
        device="cpu",
        rounds=args.rounds,
    )
    write_results(args.out, results)
    if "engine" in results:
        print("engine sampled / greedy:", results["engine"]["ratio_sampled_vs_greedy_tokens_per_cpu_s"])
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
