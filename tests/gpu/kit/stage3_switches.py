"""Stage 3, the switches: decode throughput and device idle with each of ``common.SWITCHES`` on, against
the default engine (torch_paged, eager), on the same model, prompts and steps.

Per variant: tokens/s and the percent of the bandwidth bound at batch 1 and 64 (smoke: 1 and 4), the
speed-up over the default at each, and the device's idle share between decode steps at the larger batch
with overlapped scheduling. The issue's targets are judged on a GPU for the variant meant to become the
default (``triton_paged+cuda_graphs``): >= 70% of the bound at batch 64, >= 60% at batch 1, >= 2x the
default's tokens/s at batch 64, idle <= 10%. On the CPU they are reported, not judged.
"""

from __future__ import annotations

from .common import SWITCHES, decode_checkpoint, free, make_engine, switch_unavailable
from .report import INCONCLUSIVE, Context, StageResult, Verdict, judge

CANDIDATE = "triton_paged+cuda_graphs"


def measure(ctx: Context, batches: list[int], prompt_len: int, steps: int, overrides: dict) -> dict:
    from .stage3_decode import decode_batch, device_idle_share

    engine = make_engine(decode_checkpoint(ctx), ctx.device, "bfloat16", max_num_seqs=max(batches),
                         max_model_len=prompt_len + steps + 8, **overrides)  # fmt: skip
    try:
        engine.overlap = True
        decode_batch(ctx, engine, 1, prompt_len, 2)  # warm-up: kernels, allocator
        rows = {b: decode_batch(ctx, engine, b, prompt_len, steps) for b in batches}
        idle = device_idle_share(ctx, engine, max(batches), prompt_len, steps)["device_idle_share"]
        return {"rows": rows, "idle": idle}
    finally:
        engine.shutdown()
        free(ctx.device)


def compare_switches(ctx: Context, res: StageResult, prompt_len: int, steps: int) -> None:
    batches = [1, 4] if ctx.smoke else [1, 64]
    found = {"default": measure(ctx, batches, prompt_len, steps, {})}
    for switch, overrides in SWITCHES.items():
        why = switch_unavailable(switch, ctx.device)
        if why is not None:
            res.add(Verdict(f"switch.{switch}", INCONCLUSIVE, f"not run: {why}", "measured on a GPU"))
            continue
        found[switch] = got = measure(ctx, batches, prompt_len, steps, overrides)
        base = found["default"]
        parts = []
        for b in batches:
            row, ratio = got["rows"][b], got["rows"][b]["tokens_per_s"] / base["rows"][b]["tokens_per_s"]
            row["speedup_vs_default"] = ratio
            parts.append(f"b{b} {row['tokens_per_s']:.0f} tok/s ({ratio:.2f}x, "
                         f"{row['pct_of_bandwidth_bound']:.1f}% of bound)")  # fmt: skip
        produced = all(got["rows"][b]["tokens_produced"] == b * steps for b in batches)
        res.add(judge(f"switch.{switch}", produced,
                      f"{', '.join(parts)}; idle {100 * got['idle']:.1f}% (default {100 * base['idle']:.1f}%)",
                      "every token produced; speed judged for the candidate only"))  # fmt: skip
    res.figures["switches"] = {name: {"rows": list(v["rows"].values()), "device_idle_share": v["idle"]}
                               for name, v in found.items()}  # fmt: skip
    if CANDIDATE in found:
        targets(ctx, res, found[CANDIDATE], batches)


def targets(ctx: Context, res: StageResult, got: dict, batches: list[int]) -> None:
    small, large = batches
    rows = got["rows"]
    checks = [
        (f"target.b{large}_bound", rows[large]["pct_of_bandwidth_bound"] >= 70,
         f"{rows[large]['pct_of_bandwidth_bound']:.1f}% of the bandwidth bound", ">= 70%"),
        (f"target.b{small}_bound", rows[small]["pct_of_bandwidth_bound"] >= 60,
         f"{rows[small]['pct_of_bandwidth_bound']:.1f}% of the bandwidth bound", ">= 60%"),
        (f"target.b{large}_speedup", rows[large]["speedup_vs_default"] >= 2.0,
         f"{rows[large]['speedup_vs_default']:.2f}x the default's tokens/s", ">= 2x"),
        (f"target.idle_b{large}", got["idle"] <= 0.10, f"device idle {100 * got['idle']:.1f}%", "<= 10%"),
    ]  # fmt: skip
    for check, ok, measured, threshold in checks:
        threshold = f"{threshold}, {CANDIDATE}"
        if ctx.device == "cuda" and not ctx.smoke:
            res.add(judge(check, ok, measured, threshold))
        else:
            res.add(Verdict(check, INCONCLUSIVE, measured, f"{threshold}, on a GPU"))
