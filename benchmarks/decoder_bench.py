"""Decoder engine throughput against transformers, on one checkpoint, in one process.

16 concurrent requests of mixed prompt and output lengths (token ids, so every peer gets identical
inputs), greedy, no early stop. Peers: (a) ``generate`` one request at a time, (b) a padded static batch
(``generate`` on all 16, left padding, run to the longest output), (c) transformers' continuous
batching (``init_continuous_batching`` + ``add_request``). Throughput counts generated tokens only.
Also: our decode step time (16 requests, all decoding) against a bare forward of the same batch with a
contiguous KV cache (``DynamicCache``), i.e. what the engine adds around the model. The engine runs
twice: in series (``engine``, the CPU default) and with overlapped scheduling (``engine_overlap``, the
GPU default).

The machine may be shared: every peer runs ``--rounds`` times, interleaved in a rotating order, and
reports wall and process CPU time; ratios are medians over rounds of pairs measured close together
(``ratios`` from wall time, ``ratios_cpu_time`` from CPU time). A last pass profiles a batch-16 decode
step of each engine: CPU time of the engine's parts (each on its own thread), the share of the step
the device worker sits idle waiting for the host (``device_idle_share``), and the share of torch ops
by kind.

    python benchmarks/decoder_bench.py [--checkpoint DIR] [--out benchmarks/results/decoder.json]
                                       [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
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
from services.decoder.engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.engine_common import Meter, machine, make_bench_engine, write_results  # noqa: E402

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


def _rates(produced: int, m: Meter) -> dict:
    return {
        "tokens": produced,
        "seconds": m.wall,
        "cpu_seconds": m.cpu,
        "tokens_per_s": produced / m.wall,
        "tokens_per_cpu_s": produced / m.cpu,
    }


class EngineBench:
    """One engine, built and warmed once; each ``run`` submits the workload again."""

    def __init__(self, ckpt_dir: Path, work, overlap: bool):
        self.eng = make_bench_engine(ckpt_dir, num_blocks=1024, overlap=overlap)
        self.work = work
        self.params = SamplingParams(temperature=0.0, ignore_eos=True)
        self.runs = 0
        self.run()  # warm-up

    def submit(self) -> None:
        self.runs += 1
        for i, (ids, n) in enumerate(self.work):
            req = Request(f"r{self.runs}-{i}", ids, self.params, n, eos_token_ids=self.eng.eos_token_ids)
            self.eng.add_request(req)

    def _all_decoding(self, n_running: int, events) -> bool:
        return (
            n_running == NUM_REQUESTS
            and len(events) == NUM_REQUESTS
            and all(len(e.token_ids) == 1 for e in events)
        )

    def run(self) -> dict:
        eng = self.eng
        self.submit()
        steps, produced = [], 0
        with Meter() as total:
            while eng.has_unfinished:
                n_running = eng.scheduler.num_running()
                with Meter() as m:
                    events = eng.step()
                produced += sum(len(e.token_ids) for e in events)
                if self._all_decoding(n_running, events):
                    steps.append(m)
        out = _rates(produced, total)
        out["decode_step_ms_batch16"] = statistics.median(s.wall for s in steps) * 1e3
        out["decode_step_cpu_ms_batch16"] = statistics.median(s.cpu for s in steps) * 1e3
        out["decode_steps_measured"] = len(steps)
        return out

    def profile(self, steps: int = 10) -> dict:
        """Where a batch-16 decode step goes: CPU time of the engine's parts on their own threads, how
        long the device worker (forward and draw) sits idle between steps, and torch ops by kind."""
        from torch.profiler import profile

        eng = self.eng
        runner = eng.executor.runner
        self.submit()
        while True:  # prefill until all 16 decode together
            n_running = eng.scheduler.num_running()
            if self._all_decoding(n_running, eng.step()):
                break
        parts = dict.fromkeys(
            ("prepare_inputs", "attention_metadata", "attention", "model", "sample", "device_busy_s"), 0.0
        )
        originals = []

        def wrap(obj, name, key, clock=time.thread_time):
            fn = getattr(obj, name)
            originals.append((obj, name, fn))

            def timed(*a, **k):
                c = clock()
                try:
                    return fn(*a, **k)
                finally:
                    parts[key] += clock() - c

            setattr(obj, name, timed)

        wrap(runner, "prepare", "prepare_inputs")
        wrap(runner.backend, "prepare", "attention_metadata")
        wrap(runner.backend, "forward", "attention")
        wrap(runner, "execute", "model")
        wrap(runner.sampler, "sample", "sample")
        wrap(runner, "run", "device_busy_s", clock=time.perf_counter)
        cpu0, engine_cpu0 = time.process_time(), time.thread_time()
        with Meter() as total:
            for _ in range(steps):
                eng.step()
        process_cpu, engine_cpu = time.process_time() - cpu0, time.thread_time() - engine_cpu0
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        with profile() as prof:  # op shares only: the profiler's own times are wall time
            for _ in range(3):
                eng.step()
        for rid in list(eng.scheduler.requests):
            eng.abort(rid)
        ms = {k: v / steps * 1e3 for k, v in parts.items()}
        step_ms = process_cpu / steps * 1e3
        breakdown = {
            "overlap": eng.overlap,
            "step_wall_ms": total.wall / steps * 1e3,
            "device_worker_busy_ms": ms["device_busy_s"],
            # between two steps' forwards, the model waits on the host for this share of a step
            "device_idle_share": 1.0 - parts["device_busy_s"] / total.wall,
            # the engine thread's own CPU (schedule, inputs, metadata, resolve): added to the step in
            # series, beside the forward under overlap
            "engine_thread_cpu_ms": engine_cpu / steps * 1e3,
            "engine_thread_share_of_step": engine_cpu / total.wall,
            "step_cpu_ms": step_ms,
            "model_forward_and_logits_cpu_ms": ms["model"],
            "attention_cpu_ms": ms["attention"],
            "attention_metadata_cpu_ms": ms["attention_metadata"],
            "prepare_inputs_cpu_ms": ms["prepare_inputs"],
            "sample_cpu_ms": ms["sample"],
        }
        kinds = {"matmul": 0.0, "attention_kernel": 0.0, "kv_cache_read_write": 0.0, "other_ops": 0.0}
        for ev in prof.key_averages():
            name = ev.key
            if name in ("aten::mm", "aten::addmm", "aten::bmm"):
                kinds["matmul"] += ev.self_cpu_time_total
            elif "scaled_dot_product" in name:
                kinds["attention_kernel"] += ev.self_cpu_time_total
            elif name in ("aten::index_select", "aten::index", "aten::index_copy_"):
                kinds["kv_cache_read_write"] += ev.self_cpu_time_total
            else:
                kinds["other_ops"] += ev.self_cpu_time_total
        total_ops = sum(kinds.values()) or 1.0
        breakdown["torch_op_share"] = {k: v / total_ops for k, v in kinds.items()}
        return breakdown

    def shutdown(self) -> None:
        self.eng.shutdown()


@torch.inference_mode()
def bench_sequential(model, work) -> dict:
    produced = 0
    with Meter() as m:
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
    return _rates(produced, m)


@torch.inference_mode()
def bench_static(model, work, pad_id: int) -> dict:
    longest = max(len(ids) for ids, _ in work)
    x = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids, _ in work])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids, _ in work])
    n_max = max(n for _, n in work)
    with Meter() as m:
        model.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=n_max,
            min_new_tokens=n_max,
            do_sample=False,
            pad_token_id=pad_id,
        )
    useful = sum(n for _, n in work)  # tokens the requests asked for; the rest of the batch is padding work
    out = _rates(useful, m)
    out["generated_incl_padding"] = n_max * len(work)
    return out


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
        produced, done = 0, 0
        with Meter() as m:
            for i, (ids, n) in enumerate(work):
                manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n)
            while done < len(work):
                result = manager.get_result(timeout=300)
                if result is None:
                    raise RuntimeError("transformers' continuous batching returned no result")
                if result.request_id.startswith("r"):
                    produced += len(result.generated_tokens)
                    done += 1
    finally:
        manager.stop(block=True, timeout=30)
    return _rates(produced, m)


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
        with Meter() as m:
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(m)
    return {
        "decode_step_ms_batch16": statistics.median(t.wall for t in times) * 1e3,
        "decode_step_cpu_ms_batch16": statistics.median(t.cpu for t in times) * 1e3,
    }


def _median_of(rounds: list[dict]) -> dict:
    """Per key, the median over rounds of every numeric field (errors kept from the first round)."""
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: a fresh `small` tiny checkpoint")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decoder.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of every peer; medians reported"
    )
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
    with torch.inference_mode():  # warm transformers' generate
        model.generate(input_ids=torch.tensor([work[0][0]]), max_new_tokens=4, do_sample=False)
    engine = EngineBench(ckpt, work, overlap=False)  # the CPU default
    overlapped = EngineBench(ckpt, work, overlap=True)

    def cb():
        try:
            return bench_transformers_cb(model, work)
        except Exception as exc:  # report, do not hide, a peer that cannot run here
            return {"error": f"{type(exc).__name__}: {exc}"}

    peers = {
        "engine": engine.run,
        "engine_overlap": overlapped.run,
        "sequential_generate": lambda: bench_sequential(model, work),
        "static_padded_batch": lambda: bench_static(model, work, pad_id=0),
        "transformers_continuous_batching": cb,
        "bare_forward": lambda: bench_bare_decode(model, work),
    }
    names = list(peers)
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a different order each round
            rounds[name].append(peers[name]())
            print(f"round {r} {name}", rounds[name][-1], flush=True)
    profile_serial = engine.profile()
    profile = overlapped.profile()
    engine.shutdown()
    overlapped.shutdown()

    results = {n: _median_of(rounds[n]) for n in names}
    results["profile_decode_step_batch16"] = profile
    results["profile_decode_step_batch16_serial"] = profile_serial

    def ratio(peer: str, key: str) -> float | None:
        """Median over rounds of ours / peer, each round's pair measured close together."""
        if "error" in results[peer]:
            return None
        return statistics.median(o[key] / p[key] for o, p in zip(rounds["engine"], rounds[peer], strict=True))

    def overhead(key: str) -> float:
        return statistics.median(
            (o[key] - b[key]) / o[key] for o, b in zip(rounds["engine"], rounds["bare_forward"], strict=True)
        )

    results["ratios"] = {
        "vs_sequential": ratio("sequential_generate", "tokens_per_s"),
        "vs_static_batch": ratio("static_padded_batch", "tokens_per_s"),
        "vs_transformers_cb": ratio("transformers_continuous_batching", "tokens_per_s"),
        "engine_overhead_vs_bare_forward": overhead("decode_step_ms_batch16"),
        "engine_thread_share_of_step_serial": profile_serial["engine_thread_share_of_step"],
        "overlap_vs_serial": 1 / ratio("engine_overlap", "tokens_per_s"),
        "device_idle_share_overlap": profile["device_idle_share"],
        "device_idle_share_serial": profile_serial["device_idle_share"],
    }
    results["ratios_cpu_time"] = {
        "vs_sequential": ratio("sequential_generate", "tokens_per_cpu_s"),
        "vs_static_batch": ratio("static_padded_batch", "tokens_per_cpu_s"),
        "vs_transformers_cb": ratio("transformers_continuous_batching", "tokens_per_cpu_s"),
        "engine_overhead_vs_bare_forward": overhead("decode_step_cpu_ms_batch16"),
    }
    results["targets"] = {
        "vs_sequential": 3.0,
        "vs_static_batch": 1.0,
        "vs_transformers_cb": 1.3,
        "overhead_max": 0.30,
        "device_idle_share_max": 0.02,
    }
    results["rounds"] = rounds
    results["setup"] = machine(
        checkpoint=str(ckpt) if args.checkpoint else "tiny_checkpoint preset=small llm=qwen2",
        requests=[{"prompt_tokens": len(i), "output_tokens": n} for i, n in work],
        dtype="float32",
        device="cpu",
        rounds=args.rounds,
    )
    write_results(args.out, results)
    print(
        json.dumps(
            {k: results[k] for k in ("ratios", "ratios_cpu_time", "profile_decode_step_batch16")}, indent=2
        )
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
