"""Decoder engine throughput against transformers, on one checkpoint, in one process.

16 concurrent requests of mixed prompt and output lengths (token ids, so every peer gets identical
inputs), greedy, no early stop. Peers: (a) ``generate`` one request at a time, (b) a padded static batch
(``generate`` on all 16, left padding, run to the longest output), (c) transformers' continuous
batching (``init_continuous_batching`` + ``add_request``). Throughput counts generated tokens only.
Also: our decode step time (16 requests, all decoding) against a bare forward of the same batch with a
contiguous KV cache (``DynamicCache``), i.e. what the engine adds around the model.

    python benchmarks/decoder_bench.py [--checkpoint DIR] [--out benchmarks/results/decoder.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.common.checkpoint import Checkpoint
from services.common.tiny_checkpoint import make_tiny_checkpoint
from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.engine.request import Request
from services.decoder.engine.sampling_params import SamplingParams

NUM_REQUESTS = 16


def workload(vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    prompt_lens = [rng.choice([32, 64, 128, 256, 384, 512]) for _ in range(NUM_REQUESTS)]
    output_lens = [rng.choice([16, 32, 64, 96, 128]) for _ in range(NUM_REQUESTS)]
    return [
        ([rng.randrange(20, vocab) for _ in range(p)], o)
        for p, o in zip(prompt_lens, output_lens, strict=True)
    ]


def hf_lm(ckpt_dir: Path):
    """transformers' causal LM of the checkpoint's language model (the same weights the engine loads)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    ckpt = Checkpoint.open(ckpt_dir)
    tc = dict(ckpt.text_config)
    config = CONFIG_MAPPING[tc.pop("model_type")](**tc)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {f"model.{k}": v for k, v in ckpt.load_component("language_model").items()}
    state.update({f"lm_head.{k}": v for k, v in ckpt.load_component("lm_head").items()})
    model.load_state_dict(state, strict=False)
    return model


def bench_engine(ckpt_dir: Path, work) -> dict:
    cfg = DecoderConfig(
        model=str(ckpt_dir),
        cache=CacheConfig(num_blocks=1024, block_size=16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=32),
    )
    eng = LLMEngine(cfg)
    params = SamplingParams(temperature=0.0, ignore_eos=True)

    def submit(tag: str):
        for i, (ids, n) in enumerate(work):
            eng.add_request(Request(f"{tag}{i}", ids, params, n, eos_token_ids=eng.eos_token_ids))

    submit("warm")
    while eng.has_unfinished:
        eng.step()
    submit("r")
    decode_steps, model_times = [], []
    runner = eng.executor.runner
    real_execute = runner.execute

    def timed_execute(step):
        t = time.perf_counter()
        out = real_execute(step)
        model_times.append(time.perf_counter() - t)
        return out

    runner.execute = timed_execute
    produced = 0
    start = time.perf_counter()
    while eng.has_unfinished:
        n_running = eng.scheduler.num_running()
        t = time.perf_counter()
        events = eng.step()
        dt = time.perf_counter() - t
        produced += sum(len(e.token_ids) for e in events)
        if (
            n_running == NUM_REQUESTS
            and all(len(e.token_ids) == 1 for e in events)
            and len(events) == NUM_REQUESTS
        ):
            decode_steps.append((dt, model_times[-1]))
    elapsed = time.perf_counter() - start
    runner.execute = real_execute
    eng.shutdown()
    step_s = statistics.median(d for d, _ in decode_steps) if decode_steps else float("nan")
    model_s = statistics.median(m for _, m in decode_steps) if decode_steps else float("nan")
    return {
        "tokens": produced,
        "seconds": elapsed,
        "tokens_per_s": produced / elapsed,
        "decode_step_ms_batch16": step_s * 1e3,
        "decode_step_model_ms_batch16": model_s * 1e3,
        "decode_steps_measured": len(decode_steps),
    }


@torch.inference_mode()
def bench_sequential(model, work) -> dict:
    model.generate(input_ids=torch.tensor([work[0][0]]), max_new_tokens=4, do_sample=False)
    produced, start = 0, time.perf_counter()
    for ids, n in work:
        x = torch.tensor([ids])
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        produced += out.shape[1] - x.shape[1]
    elapsed = time.perf_counter() - start
    return {"tokens": produced, "seconds": elapsed, "tokens_per_s": produced / elapsed}


@torch.inference_mode()
def bench_static(model, work, pad_id: int) -> dict:
    longest = max(len(ids) for ids, _ in work)
    x = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids, _ in work])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids, _ in work])
    n_max = max(n for _, n in work)
    start = time.perf_counter()
    model.generate(
        input_ids=x,
        attention_mask=mask,
        max_new_tokens=n_max,
        min_new_tokens=n_max,
        do_sample=False,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    useful = sum(n for _, n in work)  # tokens the requests asked for; the rest of the batch is padding work
    return {
        "tokens": useful,
        "seconds": elapsed,
        "tokens_per_s": useful / elapsed,
        "generated_incl_padding": n_max * len(work),
    }


def bench_transformers_cb(model, work) -> dict:
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=max(n for _, n in work), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        for i, (ids, _n) in enumerate(work[:2]):
            manager.add_request(ids, request_id=f"warm{i}", max_new_tokens=4)
        for _ in range(2):
            manager.get_result(timeout=120)
        start = time.perf_counter()
        for i, (ids, n) in enumerate(work):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n)
        produced, done = 0, 0
        while done < len(work):
            result = manager.get_result(timeout=300)
            if result is None:
                raise RuntimeError("transformers' continuous batching returned no result")
            if result.request_id.startswith("r"):
                produced += len(result.generated_tokens)
                done += 1
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
    return {"tokens": produced, "seconds": elapsed, "tokens_per_s": produced / elapsed}


@torch.inference_mode()
def bench_bare_decode(model, work, steps: int = 20) -> dict:
    """One decode step of the 16-request batch over a contiguous KV cache (prefilled, left-padded)."""
    from transformers import DynamicCache

    longest = max(len(ids) for ids, _ in work)
    x = torch.tensor([[0] * (longest - len(ids)) + ids for ids, _ in work])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids, _ in work])
    cache = DynamicCache()
    out = model(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(len(work), 1, dtype=mask.dtype)], dim=1)
        t = time.perf_counter()
        out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return {"decode_step_ms_batch16": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: a fresh `small` tiny checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decoder.json"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = make_tiny_checkpoint(Path(tmp.name) / "small", preset="small", llm="qwen2")
    vocab = int(Checkpoint.open(ckpt).text_config["vocab_size"])
    work = workload(vocab)
    model = hf_lm(ckpt)

    results = {"engine": bench_engine(ckpt, work)}
    print("engine", results["engine"], flush=True)
    results["sequential_generate"] = bench_sequential(model, work)
    print("sequential", results["sequential_generate"], flush=True)
    results["static_padded_batch"] = bench_static(model, work, pad_id=0)
    print("static", results["static_padded_batch"], flush=True)
    try:
        results["transformers_continuous_batching"] = bench_transformers_cb(model, work)
    except Exception as exc:  # report, do not hide, a peer that cannot run here
        results["transformers_continuous_batching"] = {"error": f"{type(exc).__name__}: {exc}"}
    print("transformers_cb", results["transformers_continuous_batching"], flush=True)
    results["bare_forward"] = bench_bare_decode(model, work)

    ours = results["engine"]["tokens_per_s"]
    cb = results["transformers_continuous_batching"].get("tokens_per_s")
    step = results["engine"]["decode_step_ms_batch16"]
    bare = results["bare_forward"]["decode_step_ms_batch16"]
    results["ratios"] = {
        "vs_sequential": ours / results["sequential_generate"]["tokens_per_s"],
        "vs_static_batch": ours / results["static_padded_batch"]["tokens_per_s"],
        "vs_transformers_cb": ours / cb if cb else None,
        "engine_overhead_vs_bare_forward": (step - bare) / step,
        "engine_overhead_around_own_model": (step - results["engine"]["decode_step_model_ms_batch16"]) / step,
    }
    results["targets"] = {
        "vs_sequential": 3.0,
        "vs_static_batch": 1.0,
        "vs_transformers_cb": 1.3,
        "overhead_max": 0.30,
    }
    results["setup"] = {
        "checkpoint": str(ckpt) if args.checkpoint else "tiny_checkpoint preset=small llm=qwen2",
        "requests": [{"prompt_tokens": len(i), "output_tokens": n} for i, n in work],
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
