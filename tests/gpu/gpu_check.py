"""GPU check for the decoder (one H200, no Ray, under 8 minutes): fidelity and speed in bf16.

1. bf16 engine vs transformers on the same checkpoint: relative error of the last-position logits of
   each prompt (prefill) and top-1 agreement over greedy decode steps (teacher-forced on the
   reference's tokens, so one early divergence does not cascade).
2. Decode tokens/s at batch 1 and 32 (greedy, ignore_eos), with the attention backend the engine picks
   (flash-attn when installed and block_size is 256) and with torch_paged.

    python tests/gpu/gpu_check.py OUT.json [--checkpoint DIR] [--preset small]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def build_checkpoint(preset: str, root: Path) -> Path:
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(root / preset, preset=preset, llm="qwen2")


def prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, len(tokenizer), (length,), generator=g).tolist() for _ in range(n)]


def make_engine(ckpt: Path, backend: str, block_size: int, max_num_seqs: int = 64):
    from services.decoder.config import CacheConfig, DecoderConfig, SchedulerConfig
    from services.decoder.engine.llm_engine import LLMEngine

    return LLMEngine(
        DecoderConfig(
            model=str(ckpt),
            device="cuda",
            dtype="bfloat16",
            attention_backend=backend,
            cache=CacheConfig(block_size=block_size, memory_fraction=0.5, enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_model_len=2048, max_num_batched_tokens=8192, max_num_seqs=max_num_seqs
            ),
        )
    )


def fidelity(ckpt: Path, engine, n_prompts: int = 8, steps: int = 32) -> dict:
    """Teacher-forced: the engine sees the reference's tokens; compare logits at every step."""
    from transformers import InternVLForConditionalGeneration

    from services.decoder.engine.request import Request
    from services.decoder.engine.sampling_params import SamplingParams

    ref = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    runner = engine.executor.runner
    captured: list[torch.Tensor] = []
    real = runner.execute

    def capture(step):
        logits = real(step)
        if logits is not None:
            captured.append(logits.float().cpu())
        return logits

    runner.execute = capture
    rel_errors, agree, total = [], 0, 0
    try:
        for i, ids in enumerate(prompts(engine.tokenizer, n_prompts, 200, seed=1)):
            x = torch.tensor([ids], device="cuda")
            with torch.no_grad():
                out = ref.generate(
                    input_ids=x,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            ref_tokens = out.sequences[0, x.shape[1] :].tolist()
            ref_logits = [lg[0].float().cpu() for lg in out.logits]
            # feed the reference's tokens: the prompt, then one forced token per step
            captured.clear()
            req = Request(
                f"f{i}",
                ids,
                SamplingParams(temperature=0.0, ignore_eos=True),
                steps,
                eos_token_ids=frozenset(),
            )
            engine.add_request(req)
            k = 0
            while engine.has_unfinished:
                engine.step()
                if req.num_output_tokens > k:  # overwrite the sampled token with the reference's
                    req.all_token_ids[-1] = ref_tokens[k]
                    k += 1
            for ours, theirs in zip(captured, ref_logits, strict=False):
                ours = ours[0]
                rel_errors.append(float((ours - theirs).norm() / theirs.norm()))
                agree += int(ours.argmax() == theirs.argmax())
                total += 1
    finally:
        runner.execute = real
        del ref
        torch.cuda.empty_cache()
    return {
        "logit_rel_error_mean": sum(rel_errors) / len(rel_errors),
        "logit_rel_error_max": max(rel_errors),
        "top1_agreement": agree / total,
        "positions": total,
    }


def throughput(engine, batch: int, prompt_len: int = 128, new_tokens: int = 128) -> dict:
    from services.decoder.engine.request import Request
    from services.decoder.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(engine.tokenizer, batch, prompt_len, seed=2)):
        engine.add_request(Request(f"w{batch}-{i}", ids, params, 4, eos_token_ids=frozenset()))
    while engine.has_unfinished:
        engine.step()
    for i, ids in enumerate(prompts(engine.tokenizer, batch, prompt_len, seed=3)):
        engine.add_request(Request(f"t{batch}-{i}", ids, params, new_tokens, eos_token_ids=frozenset()))
    engine.step()  # prefill
    torch.cuda.synchronize()
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished:
        produced += sum(len(e.token_ids) for e in engine.step())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"batch": batch, "decode_tokens": produced, "seconds": elapsed, "tokens_per_s": produced / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    report: dict = {"cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        args.out.write_text(json.dumps(report, indent=2))
        return 1
    report["device"] = torch.cuda.get_device_name()
    from services.decoder.attention.registry import is_backend_available

    report["flash_attn_available"] = is_backend_available("flash_attn", "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or build_checkpoint(args.preset, Path(tmp))
        report["checkpoint"] = str(args.checkpoint or f"tiny_checkpoint preset={args.preset}")
        backends = [("torch_paged", 16)] + ([("flash_attn", 256)] if report["flash_attn_available"] else [])
        for name, block_size in backends:
            entry: dict = {"block_size": block_size}
            t0 = time.perf_counter()
            try:
                engine = make_engine(ckpt, name, block_size)
                entry["fidelity"] = fidelity(ckpt, engine)
                entry["throughput"] = [throughput(engine, b) for b in (1, 32)]
                engine.shutdown()
            except Exception:  # keep going: one backend's failure must not hide the other's figures
                entry["error"] = traceback.format_exc()
            entry["seconds"] = time.perf_counter() - t0
            report[name] = entry
            args.out.write_text(json.dumps(report, indent=2))
            print(name, json.dumps(entry, indent=2), flush=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
