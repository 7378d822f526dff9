"""Stage 1: the tiny checkpoint on the target device, engine in bf16.

Every parameter and buffer of the engine's model (``engine.executor.runner.model``) and every KV cache
tensor must sit on the target device, and one request must run end to end: tokenized prompt in, greedy
tokens and text out, with a finish reason.
"""

from __future__ import annotations

import torch

from .common import engine_model, free, make_engine, tiny_checkpoint
from .report import Context, StageResult, judge


def misplaced(module: torch.nn.Module, device: str) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [f"{name}@{t.device}" for name, t in tensors if t.device.type != device]


def run(ctx: Context, res: StageResult) -> None:
    from services.decoder.engine.request import Request
    from services.decoder.engine.sampling_params import SamplingParams

    engine = make_engine(tiny_checkpoint(ctx), ctx.device, "bfloat16")
    try:
        model = engine_model(engine)
        count = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
        wrong = misplaced(model, ctx.device)
        wrong += [f"kv_cache[{i}]@{t.device}" for i, t in enumerate(engine.executor.runner.kv_caches)
                  if t.device.type != ctx.device]  # fmt: skip
        res.figures.update(tensors_checked=count, misplaced=wrong[:20])
        res.add(judge("placement", count > 0 and not wrong, f"{len(wrong)} of {count} tensors off {ctx.device}",
                      "0 off the device"))  # fmt: skip

        ids = engine.tokenizer.encode("Hello, 你好, InternVL")
        req = Request(
            "e2e", ids, SamplingParams(temperature=0.0, ignore_eos=True), 8, eos_token_ids=frozenset()
        )
        engine.add_request(req)
        events = []
        while engine.has_unfinished:
            events += engine.step()
        last = events[-1] if events else None
        tokens = [t for e in events for t in e.token_ids]
        res.figures.update(e2e_tokens=tokens, e2e_text="".join(e.text for e in events),
                           e2e_finish=str(last.finish_reason if last else None))  # fmt: skip
        done = last is not None and last.finish_reason is not None and last.error is None
        res.add(judge("end_to_end", done and len(tokens) == 8, f"{len(tokens)} tokens, finish {res.figures['e2e_finish']}",
                      "8 tokens and a finish reason"))  # fmt: skip
    finally:
        engine.shutdown()
        free(ctx.device)
