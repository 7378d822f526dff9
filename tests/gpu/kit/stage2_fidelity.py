"""Stage 2: fidelity in bf16, against transformers in fp32 as the reference.

On every prompt position (teacher-forced prefill) the logits of three models are compared: transformers
fp32 (reference), transformers bf16 (the noise bf16 itself brings) and the engine in bf16.

- ``logit_error``: relative Frobenius error vs fp32, ``|x - ref| / |ref|`` over all positions. PASS when
  the engine's is at most 1.5x transformers-bf16's.
- ``top1``: over the positions where fp32's top-1 margin exceeds 3x the bf16 noise at that position
  (the largest |bf16 - fp32| logit difference there), the engine's top-1 must equal fp32's on >= 99%.
  Fewer than 200 such positions: INCONCLUSIVE, never PASS.
- ``batch_invariance``: 16 mixed greedy requests batched vs each alone give identical tokens.

The engine's logits cover both paths: the first half of every prompt is one prefill (every position a
logits row), the second half is fed one token per step to the whole batch of prompts (teacher-forced
decode steps), so the decode kernels, and with ``cuda_graphs`` the captured graphs, are held to the
same reference. Each switch of ``common.SWITCHES`` is checked the same way (labels ``<model>.<switch>``,
and ``batch_invariance.<switch>``); a switch that cannot run here is INCONCLUSIVE with the reason.

Models: the tiny checkpoint and, outside smoke, a 4-layer random checkpoint with Qwen2.5-1.5B's widths.
"""

from __future__ import annotations

import torch

from .common import (
    SWITCHES,
    free,
    greedy_request,
    make_engine,
    qwen_shaped_checkpoint,
    random_prompts,
    run_to_completion,
    switch_unavailable,
    tiny_checkpoint,
)
from .report import INCONCLUSIVE, Context, StageResult, Verdict, judge

ERROR_RATIO = 1.5
TOP1_AGREEMENT = 0.99
MARGIN_OVER_NOISE = 3.0
MIN_CONFIDENT = 200


def reference_logits(ckpt, device: str, dtype: torch.dtype, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' logits at every position of every prompt: (sum of lengths, vocab), fp32 on CPU."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)  # (1, T)
            out.append(model(input_ids=x).logits[0].float().cpu())  # (T, vocab)
    del model
    free(device)
    return torch.cat(out)


def engine_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """The engine's logits at every position of every prompt (equal lengths), prompt by prompt:
    (sum of lengths, vocab). Through the model runner, with no request holding a block: positions
    below half the length in one prefill of all prompts (every position a logits row), then one
    decode step per position for all prompts at once, each fed its own next prompt token."""
    from services.decoder.engine.model_runner import ChunkWork

    runner = engine.executor.runner
    n, length = len(prompts), len(prompts[0])
    half = length // 2
    per = -(-length // runner.block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]  # disjoint blocks per prompt
    with torch.no_grad():
        step = runner.build_step(
            [ChunkWork(start=0, token_ids=p[:half], sample=True) for p in prompts], tables
        )
        step.logits_indices = torch.arange(n * half)  # (n * half,)
        prefill = runner.execute(step).float().cpu().view(n, half, -1)  # (n, half, vocab)
        decode = []
        for pos in range(half, length):
            items = [ChunkWork(start=pos, token_ids=[p[pos]], sample=True) for p in prompts]
            decode.append(runner.execute(runner.build_step(items, tables)).float().cpu())  # (n, vocab)
    out = torch.cat((prefill, torch.stack(decode, dim=1)), dim=1)  # (n, length, vocab)
    return out.reshape(n * length, -1)


def compare(ref: torch.Tensor, hf_bf16: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    def rel(x: torch.Tensor) -> float:
        return float((x - ref).norm() / ref.norm())

    top2 = ref.topk(2, dim=-1).values  # (N, 2)
    margin = top2[:, 0] - top2[:, 1]
    noise = (hf_bf16 - ref).abs().amax(dim=-1)  # (N,)
    confident = margin > MARGIN_OVER_NOISE * noise
    agree = (ours.argmax(-1) == ref.argmax(-1))[confident]
    return {
        "positions": ref.shape[0],
        "hf_bf16_rel_error": rel(hf_bf16),
        "engine_bf16_rel_error": rel(ours),
        "confident_positions": int(confident.sum()),
        "engine_top1_agreement_confident": float(agree.float().mean()) if agree.numel() else 0.0,
        "engine_top1_agreement_all": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def engine_pass(ctx: Context, ckpt, n: int, length: int, **overrides) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` random prompts of ``length`` tokens and the engine's logits on them; the engine is gone
    (its memory free) when this returns."""
    engine = make_engine(ckpt, ctx.device, "bfloat16", **overrides)
    try:
        prompts = random_prompts(n, length, engine.vocab_size, seed=1)
        return prompts, engine_logits(engine, prompts)
    finally:
        engine.shutdown()
        del engine
        free(ctx.device)


def fidelity(ctx: Context, res: StageResult, label: str, ckpt, n: int, length: int) -> None:
    """The default engine, then every switch that runs here, against the same references."""
    prompts, ours = engine_pass(ctx, ckpt, n, length)
    ref = reference_logits(ckpt, ctx.device, torch.float32, prompts)
    hf_bf16 = reference_logits(ckpt, ctx.device, torch.bfloat16, prompts)
    judge_logits(res, label, compare(ref, hf_bf16, ours))
    for switch, overrides in SWITCHES.items():
        why = switch_unavailable(switch, ctx.device)
        if why is not None:
            res.add(
                Verdict(f"{label}.{switch}", INCONCLUSIVE, f"not run: {why}", "stage 2 passes with it on")
            )
            continue
        _, ours = engine_pass(ctx, ckpt, n, length, **overrides)
        judge_logits(res, f"{label}.{switch}", compare(ref, hf_bf16, ours))


def judge_logits(res: StageResult, label: str, f: dict) -> None:
    res.figures[label] = f
    limit = ERROR_RATIO * f["hf_bf16_rel_error"]
    res.add(judge(f"{label}.logit_error", f["engine_bf16_rel_error"] <= limit,
                  f"engine {f['engine_bf16_rel_error']:.3e} rel vs fp32",
                  f"<= {ERROR_RATIO}x transformers-bf16 {f['hf_bf16_rel_error']:.3e} = {limit:.3e}"))  # fmt: skip
    agreement, k = f["engine_top1_agreement_confident"], f["confident_positions"]
    measured = f"{agreement:.2%} of {k} positions with fp32 margin > {MARGIN_OVER_NOISE}x bf16 noise"
    threshold = f">= {TOP1_AGREEMENT:.0%} over >= {MIN_CONFIDENT} positions"
    if k < MIN_CONFIDENT:
        res.add(Verdict(f"{label}.top1", INCONCLUSIVE, measured, threshold))
    else:
        res.add(judge(f"{label}.top1", agreement >= TOP1_AGREEMENT, measured, threshold))


def batch_invariance(ctx: Context, res: StageResult, ckpt, switch: str = "") -> None:
    engine = make_engine(ckpt, ctx.device, "bfloat16", max_num_seqs=16, **SWITCHES.get(switch, {}))
    check = f"batch_invariance.{switch}" if switch else "batch_invariance"
    try:
        g = torch.Generator().manual_seed(5)
        lengths = torch.randint(3, 200, (16,), generator=g).tolist()
        steps = torch.randint(2, 24, (16,), generator=g).tolist()
        prompts = [random_prompts(1, n, engine.vocab_size, seed=100 + i)[0] for i, n in enumerate(lengths)]
        batched = run_to_completion(
            engine,
            [greedy_request(f"b{i}", p, s) for i, (p, s) in enumerate(zip(prompts, steps, strict=True))],
        )
        alone = {}
        for i, (p, s) in enumerate(zip(prompts, steps, strict=True)):
            alone.update(run_to_completion(engine, [greedy_request(f"a{i}", p, s)]))
        differ = [i for i in range(16) if batched[f"b{i}"] != alone[f"a{i}"]]
        res.figures[check] = {"prompt_lengths": lengths, "max_tokens": steps, "differ": differ}
        res.add(judge(check, not differ, f"{len(differ)} of 16 requests differ batched vs alone",
                      "0 differ (greedy tokens identical)"))  # fmt: skip
    finally:
        engine.shutdown()
        free(ctx.device)


def run(ctx: Context, res: StageResult) -> None:
    fidelity(ctx, res, "tiny", tiny_checkpoint(ctx), n=4, length=128)
    if not ctx.smoke:
        fidelity(ctx, res, "qwen2_5_1_5b_4l", qwen_shaped_checkpoint(ctx), n=8, length=512)
    ckpt = tiny_checkpoint(ctx) if ctx.smoke else qwen_shaped_checkpoint(ctx)
    batch_invariance(ctx, res, ckpt)
    for switch in SWITCHES:
        if switch_unavailable(switch, ctx.device) is None:
            batch_invariance(ctx, res, ckpt, switch)
