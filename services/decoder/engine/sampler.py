"""Per-request sampling over a batch of logits (rank 0 only), as one set of tensor operations.

Order of operations (as vLLM and transformers): logprobs are taken from the raw model distribution;
then penalties (repetition over prompt + output, frequency/presence over output), temperature,
top-k, top-p, and a draw. Greedy rows take the argmax of the penalised logits.

The whole batch goes through each stage at once: per-row parameters become tensors, penalties come
from token-count tensors (``penalties.TokenCounts``), the filters from one sort of the rows with a
top-p and one ``topk`` of the rows with only a top-k, and every sampled row is drawn by one Gumbel-max
``argmax`` (``gumbel``). ``sample`` leaves the step's ids and logprobs on the device (``DeviceSample``):
they reach the host in one transfer, the logprobs (when a row asks for them) in one more, started
without blocking and waited for only when the engine resolves the step.

Filters: top-k keeps the tokens whose logit is at least the k-th largest (ties with it included);
top-p then keeps the smallest prefix of the remaining tokens, best first, whose probability reaches
``top_p`` (a token is dropped when the mass before it already does; the best token always stays).

Seeds: a row with a seed draws with counter-based noise keyed by (seed, tokens generated so far), so its
tokens depend only on its seed and its logits, whatever shares the batch, where the row sits in it, and
across preemption; rows without one share the engine's generator. Bit-for-bit on the CPU; on a GPU the
logits themselves (and a filter's boundary) can move with the batch's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.decoder.engine.gumbel import GumbelNoise, seeded_key
from services.decoder.engine.logit_constraints import apply_logit_constraints
from services.decoder.engine.penalties import TokenCounts
from services.decoder.engine.request import Request
from services.decoder.engine.sampling_params import SamplingParams
from services.decoder.types import TokenLogprob, TopLogprob

# What sampling may hold at its peak, in bytes per vocabulary entry of each row it samples: the logits
# (4), the working set of one step (32 measured: a top-p sort's values and int64 indices, its softmax and
# cumulative sum, the noise, the penalised copy) and a penalised request's token counts (5). The model
# runner keeps this much out of the KV cache for ``max_num_seqs`` rows.
BYTES_PER_LOGIT = 41


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True)
class SampleRow:
    """What sampling reads of a request, taken when its step is launched (the request moves on while
    the step runs). The token ids are copied only for a row with penalties, the one reader."""

    request_id: str
    sampling_params: SamplingParams
    num_output_tokens: int
    num_prompt_tokens: int
    all_token_ids: tuple[int, ...]
    grammar: Any = None  # the request's ``structured.Grammar``: its steps run in series (``needs_sync``)

    @classmethod
    def of(cls, req: Request) -> SampleRow:
        p = req.sampling_params
        if (p.needs_penalties or req.needs_sync) and req.num_pending:
            raise RuntimeError(f"{req!r}: sampling it needs its tokens, one is still on the device")
        ids = tuple(req.all_token_ids) if p.needs_penalties else ()
        return cls(req.request_id, p, req.num_output_tokens, req.num_prompt_tokens, ids, req.grammar)


class DeviceSample:
    """A step's draw while it may still be on the device: the ids (the next step's placeholders read
    them there) and the logprob table; ``to_host`` starts their copy, ``result`` waits for it."""

    def __init__(self, tokens: torch.Tensor, table: torch.Tensor | None, params: list[SamplingParams]):
        self.tokens = tokens  # (B,) int64
        self.table = table  # (L, 1 + 2k) float64 for the rows that ask for logprobs
        self.params = params
        self._host: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._ready = None

    def to_host(self) -> None:
        """Copy to page-locked host memory without blocking; a no-op on the CPU."""
        if self.tokens.device.type != "cuda":
            return
        pinned = [
            None if t is None else torch.empty_like(t, device="cpu", pin_memory=True)
            for t in (self.tokens, self.table)
        ]
        for dst, src in zip(pinned, (self.tokens, self.table), strict=True):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()
        self._host = (pinned[0], pinned[1])

    def result(self) -> SamplerOutput:
        tokens, table = (self.tokens, self.table) if self._host is None else self._host
        if self._ready is not None:
            self._ready.synchronize()
        token_ids = tokens.tolist()  # on the CPU (or once the copy is done): the one transfer of ids
        return SamplerOutput(token_ids, _logprob_rows(table, token_ids, self.params))


def _index(rows: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    """The rows as an index tensor, or None when they are all ``total`` rows in order."""
    if len(rows) == total:
        return None
    return torch.tensor(rows, dtype=torch.long, device=device)


def _top_k(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """``x`` (F, V) less the tokens below each row's k-th largest logit: one ``topk`` of the largest k."""
    k = torch.tensor(top_k, dtype=torch.long, device=x.device)[:, None]  # (F, 1)
    kth = x.topk(max(top_k), dim=-1).values.gather(1, k - 1)  # (F, 1)
    return x.masked_fill(x < kth, float("-inf"))


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """``x`` (F, V) with both filters: one descending sort, the masks in sorted order, scattered back."""
    dev = x.device
    k = torch.tensor(top_k, dtype=torch.long, device=dev)[:, None]  # (F, 1)
    p = torch.tensor(top_p, dtype=x.dtype, device=dev)[:, None]  # (F, 1)
    ordered, order = x.sort(dim=-1, descending=True)  # (F, V) each
    ordered.masked_fill_(ordered < ordered.gather(1, k - 1), float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1).sub_(probs)  # (F, V): the mass before each token
    ordered.masked_fill_(before >= p, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, ordered)


def filter_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """``x`` (F, V) temperature-scaled logits with the dropped tokens at -inf (a new tensor).

    ``top_k[i]`` in 1..V (V: off), ``top_p[i]`` in (0, 1] (1: off); every row has at least one filter.
    The rows with a top-p go through one sort together, the rows with only a top-k through one ``topk``.
    """
    by_p = [i for i, p in enumerate(top_p) if p < 1.0]
    by_k = [i for i, p in enumerate(top_p) if p >= 1.0]
    if not by_k:
        return _top_k_top_p(x, top_k, top_p)
    if not by_p:
        return _top_k(x, top_k)
    dev = x.device
    k_index = torch.tensor(by_k, dtype=torch.long, device=dev)
    p_index = torch.tensor(by_p, dtype=torch.long, device=dev)
    out = torch.empty_like(x)
    out.index_copy_(0, k_index, _top_k(x[k_index], [top_k[i] for i in by_k]))
    out.index_copy_(0, p_index, _top_k_top_p(x[p_index], [top_k[i] for i in by_p], [top_p[i] for i in by_p]))
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.noise = GumbelNoise(device, self.shared)
        self.counts = TokenCounts(device)

    def release(self, request_id: str) -> None:
        """The request ended: its token counts go."""
        self.counts.release(request_id)

    def __call__(self, logits: torch.Tensor, requests: list[Request] | list[SampleRow]) -> SamplerOutput:
        """logits (B, V) float32, one row per request that samples this step."""
        return self.sample(logits, requests).result()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request] | list[SampleRow]) -> DeviceSample:
        """The draw of every row, left on the device (no transfer, no sync)."""
        params = [r.sampling_params for r in requests]
        raw = logits  # logprobs come from the model's own distribution
        penalised = [i for i, p in enumerate(params) if p.needs_penalties]
        if penalised:
            index = _index(penalised, len(requests), logits.device)
            sub = logits if index is None else logits[index]
            sub = self.counts.apply(sub, [requests[i] for i in penalised])
            logits = sub if index is None else logits.index_copy(0, index, sub)
        logits = apply_logit_constraints(logits, requests)  # logit_bias, then the grammars' masks

        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if not drawn:
            tokens = logits.argmax(dim=-1)  # (B,)
        else:
            tokens = self._draw(logits, requests, drawn)
        return DeviceSample(tokens, self._logprob_table(raw, tokens, params), params)

    def _draw(self, logits: torch.Tensor, requests, drawn: list[int]) -> torch.Tensor:
        """(B,) ids: a draw for the rows ``drawn``, the argmax for the others (greedy)."""
        dev, vocab = logits.device, logits.shape[1]
        params: list[SamplingParams] = [requests[i].sampling_params for i in drawn]
        index = _index(drawn, len(requests), dev)
        x = logits if index is None else logits[index]  # (S, V)
        temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)
        x = x / temperature[:, None]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        filtered = [j for j, p in enumerate(params) if top_k[j] < vocab or p.top_p < 1.0]
        if filtered:
            f_index = _index(filtered, len(params), dev)
            sub = filter_top_k_top_p(
                x if f_index is None else x[f_index],
                [top_k[j] for j in filtered],
                [params[j].top_p for j in filtered],
            )
            x = sub if f_index is None else x.index_copy(0, f_index, sub)

        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        keys = None
        if seeded:
            steps = [requests[drawn[j]].num_output_tokens for j in seeded]
            keys = torch.tensor(
                [seeded_key(params[j].seed, n) for j, n in zip(seeded, steps, strict=True)],
                dtype=torch.long,
                device=dev,
            )
        picked = self.noise(len(drawn), vocab, keys, seeded).add_(x).argmax(dim=-1)  # (S,)
        if index is None:
            return picked
        return logits.argmax(dim=-1).index_copy(0, index, picked)

    @staticmethod
    def _logprob_table(
        raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
    ) -> torch.Tensor | None:
        """(L, 1 + 2k) float64 for the L rows that ask: the chosen token's logprob, then the top k
        alternatives' logprobs and ids (float64 holds float32 logprobs and token ids exactly)."""
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return None
        index = _index(wanted, len(params), raw.device)
        lp = torch.log_softmax(raw if index is None else raw[index], dim=-1)  # (L, V)
        chosen = tokens if index is None else tokens[index]
        cols = [lp.gather(1, chosen[:, None])]  # (L, 1)
        k = max(params[i].logprobs for i in wanted)
        if k:
            vals, ids = lp.topk(k, dim=-1)  # (L, k) each, best first
            cols += [vals, ids]
        return torch.cat([c.double() for c in cols], dim=1)


def _logprob_rows(
    table: torch.Tensor | None, token_ids: list[int], params: list[SamplingParams]
) -> list[TokenLogprob | None]:
    """The rows of ``Sampler._logprob_table``, on the host, as each request's ``TokenLogprob``."""
    out: list[TokenLogprob | None] = [None] * len(params)
    if table is None:
        return out
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    k = max(params[i].logprobs for i in wanted)
    for i, row in zip(wanted, table.tolist(), strict=True):
        n = params[i].logprobs
        top = [TopLogprob(int(t), v) for t, v in zip(row[1 + k : 1 + k + n], row[1 : 1 + n], strict=True)]
        out[i] = TokenLogprob(token_ids[i], row[0], top)
    return out
