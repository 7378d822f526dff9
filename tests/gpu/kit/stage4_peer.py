"""Stage 4: transformers' own ``generate`` on the same checkpoint, bf16, greedy, as the peer.

Batch 1, and batch 32 left-padded (prompt lengths drawn in [prompt/2, prompt], so the padding is real).
Decode time is ``generate(N new tokens) - generate(1 new token)`` over N - 1 steps, so prefill is out
of it as in stage 3. Reported: tokens/s, and the engine's tokens/s (stage 3, same batch, equal-length
prompts) over transformers'.
"""

from __future__ import annotations

import torch

from .common import decode_checkpoint, free, random_prompts, timed
from .report import Context, StageResult, judge
from .stage3_decode import plan


def hf_decode_tokens_per_s(
    model, ctx: Context, batch: int, prompt_len: int, steps: int, pad_id: int
) -> float:
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(batch)
    lengths = (
        [prompt_len]
        if batch == 1
        else torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g).tolist()
    )
    ids = torch.full((batch, max(lengths)), pad_id, dtype=torch.long)  # (B, L), left-padded
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.tensor(random_prompts(1, n, vocab, seed=1000 + i)[0])
        mask[i, -n:] = 1
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)

    def generate(new: int):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=pad_id)  # fmt: skip

    generate(2)  # warm-up
    full_wall, full_gpu = timed(ctx.device, lambda: generate(steps))
    pre_wall, pre_gpu = timed(ctx.device, lambda: generate(1))
    decode_s = (full_gpu - pre_gpu) if full_gpu is not None else (full_wall - pre_wall)
    return batch * (steps - 1) / max(decode_s, 1e-9)


def run(ctx: Context, res: StageResult) -> None:
    from transformers import InternVLForConditionalGeneration

    _, prompt_len, steps = plan(ctx.smoke)
    ckpt = decode_checkpoint(ctx)
    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).to(ctx.device).eval()
    pad_id = int(model.config.text_config.pad_token_id)
    try:
        for batch in (1, 4 if ctx.smoke else 32):
            hf = hf_decode_tokens_per_s(model, ctx, batch, prompt_len, steps, pad_id)
            ours = ctx.decode_tokens_per_s.get(batch)
            ratio = ours / hf if ours else None
            res.figures[f"b{batch}"] = {
                "hf_tokens_per_s": hf,
                "engine_tokens_per_s": ours,
                "engine_over_hf": ratio,
            }
            shown = f"{ratio:.2f}x" if ratio else "n/a (stage 3 did not run)"
            res.add(judge(f"peer.b{batch}", hf > 0, f"transformers {hf:.0f} tok/s, engine/transformers {shown}",
                          "ratio reported, not judged"))  # fmt: skip
    finally:
        del model
        free(ctx.device)
