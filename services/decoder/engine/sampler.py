"""Per-request sampling over a batch of logits (rank 0 only).

Order of operations (as vLLM and transformers): logprobs are taken from the raw model distribution;
then penalties (repetition over prompt + output, frequency/presence over output), temperature,
top-k, top-p, and a draw. Greedy rows take the argmax of the penalised logits. A request with a seed
owns a ``torch.Generator`` for its whole life (preemption included), so its draws do not depend on
what else shares the batch; requests without a seed share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.decoder.engine.request import Request
from services.decoder.types import TokenLogprob, TopLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        seed = req.sampling_params.seed
        if seed is None:
            return self.shared
        g = self.generators.get(req.request_id)
        if g is None:
            g = self.generators[req.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits (B, V) float32, one row per request that samples this step."""
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None  # (B, V)

        if any(p.needs_penalties for p in params):
            logits = logits.clone()
            for i, (req, p) in enumerate(zip(requests, params, strict=True)):
                if p.needs_penalties:
                    self._apply_penalties(logits[i], req)

        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = []
            for i, (req, p) in enumerate(zip(requests, params, strict=True)):
                tokens.append(int(logits[i].argmax()) if p.greedy else self._draw(logits[i], req))

        logprobs: list[TokenLogprob | None] = []
        for i, (tok, p) in enumerate(zip(tokens, params, strict=True)):
            if not want_logprobs[i]:
                logprobs.append(None)
                continue
            row = raw_logprobs[i]
            top = []
            if p.logprobs:
                vals, ids = row.topk(p.logprobs)
                top = [TopLogprob(t, v) for t, v in zip(ids.tolist(), vals.tolist(), strict=True)]
            logprobs.append(TokenLogprob(tok, float(row[tok]), top))
        return SamplerOutput(tokens, logprobs)

    def _apply_penalties(self, row: torch.Tensor, req: Request) -> None:
        """In place on one row (V,)."""
        p = req.sampling_params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), device=row.device)
            score = row[seen]
            row[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and req.num_output_tokens:
            out = torch.tensor(req.output_token_ids, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)  # (V,)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _draw(self, row: torch.Tensor, req: Request) -> int:
        p = req.sampling_params
        row = row / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = row.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(req)))
