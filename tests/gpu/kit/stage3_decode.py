"""Stage 3: decode throughput of the engine in bf16, greedy, every request ``ignore_eos``.

Batches 1/8/32/64/128 of 1024-token prompts, 64 decode steps each (smoke: batches 1/4, 32 tokens, 8
steps). Prefill runs first and is not timed; then every engine step is one decode step of the whole
batch. Reported per batch: wall seconds per step, GPU seconds per step from CUDA events (wall only on
CPU), tokens/s = batch / step time, and the percent of the bandwidth bound: the time to read the weights
read each step (all but the embedding table, which a step gathers B rows of) plus the KV bytes the batch
attends over, at stage 0's measured copy bandwidth, divided by the measured step time.

Then each switch (``stage3_switches``): the same decode with it on, against the default engine.
"""

from __future__ import annotations

import time

import torch

from services.decoder.engine.sampling_params import SamplingParams

from .common import decode_checkpoint, engine_model, free, greedy_request, make_engine, random_prompts
from .report import INCONCLUSIVE, Context, StageResult, Verdict, judge
from .stage3_switches import compare_switches


def plan(smoke: bool) -> tuple[list[int], int, int]:
    """(batches, prompt length, decode steps)."""
    return ([1, 4], 32, 8) if smoke else ([1, 8, 32, 64, 128], 1024, 64)


def streamed_weight_bytes(engine) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table."""
    model = engine_model(engine)
    return sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name
    )


def decode_batch(
    ctx: Context, engine, batch: int, prompt_len: int, steps: int, sampling=None
) -> dict[str, float]:
    prompts = random_prompts(batch, prompt_len, engine.vocab_size, seed=batch)
    reqs = [greedy_request(f"d{batch}-{i}", p, steps + 1, sampling) for i, p in enumerate(prompts)]
    for req in reqs:
        engine.add_request(req)
    while any(r.num_output_tokens - r.num_pending == 0 for r in reqs):  # prefill, its first token: untimed
        engine.step()
    cuda = ctx.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record()
    start, n_steps, produced = time.perf_counter(), 0, 0
    while engine.has_unfinished:
        produced += sum(len(e.token_ids) for e in engine.step())
        n_steps += 1
    if cuda:
        end_ev.record()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / n_steps
    gpu = start_ev.elapsed_time(end_ev) / 1e3 / n_steps if cuda else None
    step_s = gpu if gpu is not None else wall
    runner = engine.executor.runner
    kv_per_token = runner.bytes_per_block() // runner.block_size
    mean_ctx = prompt_len + steps / 2
    bytes_per_step = streamed_weight_bytes(engine) + batch * mean_ctx * kv_per_token
    bound_s = bytes_per_step / (ctx.bounds["copy_GB_s"] * 1e9)
    return {
        "batch": batch,
        "decode_steps": n_steps,
        "tokens_produced": produced,
        "wall_ms_per_step": wall * 1e3,
        "gpu_ms_per_step": None if gpu is None else gpu * 1e3,
        "tokens_per_s": batch / step_s,
        "MB_read_per_step": bytes_per_step / 1e6,
        "pct_of_bandwidth_bound": 100 * bound_s / step_s,
    }


def run(ctx: Context, res: StageResult) -> None:
    from .stage0_device import copy_bandwidth

    batches, prompt_len, steps = plan(ctx.smoke)
    if "copy_GB_s" not in ctx.bounds:  # stage 0 not run: measure the bound here
        ctx.bounds["copy_GB_s"] = copy_bandwidth(ctx.device, ctx.smoke)
    res.figures["copy_GB_s_bound"] = ctx.bounds["copy_GB_s"]
    engine = make_engine(decode_checkpoint(ctx), ctx.device, "bfloat16", max_num_seqs=max(batches),
                         max_model_len=prompt_len + steps + 8)  # fmt: skip
    rows = []
    try:
        decode_batch(ctx, engine, 1, prompt_len, 2)  # warm-up: kernels, allocator
        for batch in batches:
            row = decode_batch(ctx, engine, batch, prompt_len, steps)
            rows.append(row)
            ctx.decode_tokens_per_s[batch] = row["tokens_per_s"]
            clock = "GPU" if row["gpu_ms_per_step"] is not None else "wall"
            step_ms = (
                row["gpu_ms_per_step"] if row["gpu_ms_per_step"] is not None else row["wall_ms_per_step"]
            )
            res.add(judge(
                f"decode.b{batch}",
                row["tokens_produced"] == batch * steps,
                f"{row['tokens_produced']} tokens, {step_ms:.2f} ms/step ({clock}), {row['tokens_per_s']:.0f} tok/s, "
                f"{row['pct_of_bandwidth_bound']:.1f}% of bandwidth bound",
                f"{batch * steps} tokens; speed reported, not judged",
            ))  # fmt: skip
        idle_checks(ctx, engine, res, max(batches) if ctx.smoke else 64, prompt_len, steps)
    finally:
        res.figures["prompt_len"], res.figures["decode_steps"], res.figures["rows"] = prompt_len, steps, rows
        engine.shutdown()
        free(ctx.device)
    compare_switches(ctx, res, prompt_len, steps)


def device_idle_share(ctx: Context, engine, batch: int, prompt_len: int, steps: int, sampling=None) -> dict:
    """Decode ``batch`` requests and time each launched step on the device (CUDA events around the
    device worker's job; wall clock on the CPU): the share of the run between two steps' spans is the
    time the device waited for the host."""
    runner = engine.executor.runner
    spans: list[tuple] = []
    run_step = runner.run
    cuda = ctx.device == "cuda"

    def mark():
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def timed(*args):
        start = mark()
        try:
            return run_step(*args)
        finally:
            spans.append((start, mark()))

    runner.run = timed
    try:
        row = decode_batch(ctx, engine, batch, prompt_len, steps, sampling)
    finally:
        runner.run = run_step
    spans = spans[-steps:]  # the timed decode steps
    if cuda:
        torch.cuda.synchronize()
        busy = sum(a.elapsed_time(b) / 1e3 for a, b in spans)
        total = spans[0][0].elapsed_time(spans[-1][1]) / 1e3
    else:
        busy = sum(b - a for a, b in spans)
        total = spans[-1][1] - spans[0][0]
    return {**row, "device_idle_share": 1.0 - busy / total}


def idle_checks(ctx: Context, engine, res: StageResult, batch: int, prompt_len: int, steps: int) -> None:
    """Overlapped scheduling's two targets: the device idle between decode steps at ``batch``, and
    sampled (temperature 0.8, top-p 0.9) against greedy throughput at batch 32."""
    rows, default = {}, engine.overlap
    for overlap in (True, False):
        engine.overlap = overlap
        rows[overlap] = device_idle_share(ctx, engine, batch, prompt_len, steps)
    engine.overlap = default
    idle = rows[True]["device_idle_share"]
    res.figures["idle"] = {"batch": batch, "overlap": rows[True], "serial": rows[False]}
    measured = (
        f"device idle {100 * idle:.1f}% of the run with overlap, "
        f"{100 * rows[False]['device_idle_share']:.1f}% in series"
    )
    _target(ctx, res, f"decode.idle_b{batch}", idle <= 0.10, measured, "<= 10% with overlap")
    b = min(32, batch)
    greedy = decode_batch(ctx, engine, b, prompt_len, steps)
    sampled = decode_batch(
        ctx, engine, b, prompt_len, steps, SamplingParams(temperature=0.8, top_p=0.9, ignore_eos=True)
    )
    ratio = sampled["tokens_per_s"] / greedy["tokens_per_s"]
    res.figures["sampled_vs_greedy"] = {"batch": b, "greedy": greedy, "sampled": sampled, "ratio": ratio}
    _target(ctx, res, f"decode.sampled_vs_greedy_b{b}", ratio >= 0.9, f"{ratio:.2f}x", ">= 0.9x")


def _target(ctx: Context, res: StageResult, check: str, ok: bool, measured: str, threshold: str) -> None:
    """A GPU target: judged on a GPU; on the CPU (the kit's own smoke run) reported, not judged."""
    if ctx.device == "cuda" and not ctx.smoke:
        res.add(judge(check, ok, measured, threshold))
    else:
        res.add(Verdict(check, INCONCLUSIVE, measured, f"{threshold}, on a GPU"))
