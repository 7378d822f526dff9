"""Repetition, frequency and presence penalties for a batch, from token-count tensors on the device.

``TokenCounts`` keeps one row per request that asks for a penalty: how often each vocabulary token
occurs in its output (float32: exact to 2**24, past any context) and whether it occurs in its prompt (bool). A step brings the rows up to
date with only the tokens added since the last one (a decode adds one; a request's tokens only grow,
preemption included), with one scatter for the whole batch; its row is freed when the request ends.
Memory: 5 bytes per vocabulary entry per penalised request in flight.

The rules (as vLLM and transformers): the CTRL repetition penalty over prompt and output tokens
(divide a positive logit, multiply a negative one), then OpenAI's ``frequency * count + presence *
(count > 0)`` subtracted over output tokens.
"""

from __future__ import annotations

import torch

from services.decoder.engine.request import Request


class TokenCounts:
    def __init__(self, device: torch.device):
        self.device = device
        self.output: torch.Tensor | None = None  # (capacity, V) float32: output occurrences per token
        self.prompt: torch.Tensor | None = None  # (capacity, V) bool: the token occurs in the prompt
        self.rows: dict[str, list[int]] = {}  # request id -> [row, tokens already counted]
        self.free: list[int] = []

    @torch.inference_mode()  # the tensors are made under it (the sampler's step)
    def release(self, request_id: str) -> None:
        entry = self.rows.pop(request_id, None)
        if entry is not None:
            self.output[entry[0]] = 0
            self.prompt[entry[0]] = False
            self.free.append(entry[0])

    def _grow(self, needed: int, vocab: int) -> None:
        have = 0 if self.output is None else self.output.shape[0]
        if self.output is not None and self.output.shape[1] != vocab:
            raise ValueError(f"logits of {vocab} tokens after {self.output.shape[1]}")
        if len(self.free) >= needed:
            return
        size = max(have + needed - len(self.free), 2 * have, 8)
        output = torch.zeros(size, vocab, dtype=torch.float32, device=self.device)
        prompt = torch.zeros(size, vocab, dtype=torch.bool, device=self.device)
        if have:
            output[:have] = self.output
            prompt[:have] = self.prompt
        self.output, self.prompt = output, prompt
        self.free += range(size - 1, have - 1, -1)

    def update(self, requests: list[Request], vocab: int) -> torch.Tensor:
        """Count the tokens each request added since the last step; (P,) int64 rows of ``requests``."""
        self._grow(sum(r.request_id not in self.rows for r in requests), vocab)
        rows, p_rows, p_ids, o_rows, o_ids = [], [], [], [], []
        for req in requests:
            entry = self.rows.get(req.request_id)
            if entry is None:
                entry = self.rows[req.request_id] = [self.free.pop(), 0]
            row, counted = entry
            ids, n_prompt = req.all_token_ids, req.num_prompt_tokens
            if counted < n_prompt:
                new = ids[counted:n_prompt]
                p_ids += new
                p_rows += [row] * len(new)
            new = ids[max(counted, n_prompt) :]
            o_ids += new
            o_rows += [row] * len(new)
            entry[1] = len(ids)
            rows.append(row)
        dev = self.device
        if p_ids:
            index = (torch.tensor(p_rows, device=dev), torch.tensor(p_ids, device=dev))
            self.prompt.index_put_(index, torch.ones((), dtype=torch.bool, device=dev))
        if o_ids:
            index = (torch.tensor(o_rows, device=dev), torch.tensor(o_ids, device=dev))
            ones = torch.ones(len(o_ids), dtype=torch.float32, device=dev)
            self.output.index_put_(index, ones, accumulate=True)
        return torch.tensor(rows, dtype=torch.long, device=dev)

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` (P, V) of ``requests`` (each asking for a penalty), penalised, as a new tensor.

        A rule no row of the batch uses is skipped (its neutral value would leave the logits as they are).
        """
        rows = self.update(requests, logits.shape[1])
        params = [r.sampling_params for r in requests]
        cols = torch.tensor(
            [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
            dtype=logits.dtype,
            device=logits.device,
        )  # (P, 3)
        rep, freq, pres = cols[:, 0:1], cols[:, 1:2], cols[:, 2:3]  # (P, 1) each
        counts = self.output[rows].to(logits.dtype)  # (P, V), a copy
        present = counts > 0
        out = logits.clone()  # in place from here on: fewer (P, V) buffers
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self.prompt[rows].logical_or_(present)  # (P, V)
            negative = out < 0
            one = torch.ones((), dtype=out.dtype, device=out.device)
            # x * rep where seen and negative, x / rep where seen otherwise (x * 1 / 1 is x, exactly)
            factor = torch.where(seen & negative, rep, one)  # (P, V)
            out.mul_(factor)
            out.div_(torch.where(seen.logical_and_(negative.logical_not_()), rep, one, out=factor))
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            adjust = counts.mul_(freq)  # frequency * count
            if any(p.presence_penalty != 0.0 for p in params):
                adjust.add_(pres * present)  # + presence * (count > 0)
            out.sub_(adjust)
        return out
