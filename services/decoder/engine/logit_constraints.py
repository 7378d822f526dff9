"""What a request imposes on its logits before temperature and filters: ``logit_bias`` and a grammar.

``apply_logit_constraints`` is the sampler's one call between the penalties and the draw. The rows with
a ``logit_bias`` get their biases added by one ``index_put_`` for the whole batch; the rows with a
grammar (``Request.grammar``, ``engine.structured``) get the tokens it does not allow next set to -inf,
from a packed bitmask (32 tokens to an int32) that llguidance fills for all of them in one call: no
Python loop over the vocabulary. The bitmask becomes an additive mask (0 or -inf per token) by one
lookup of its bytes in a 256 x 8 table, and one addition applies it; over a 151,936-token vocabulary
that is about 7x cheaper on a CPU than unpacking bits with shifts and ``masked_fill``. Bias first, so a
bias can never bring back a token the grammar forbids. A batch with neither returns its logits
untouched (the same tensor); otherwise the result is a new tensor and the input is left as it was (the
sampler takes the log-probabilities from it).
"""

from __future__ import annotations

import torch

from services.decoder.engine.request import Request
from services.decoder.engine.structured import Grammar, fill_bitmask

_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row ``b`` holds, for bit ``j`` of the byte ``b``, 0 where it is set and -inf where not."""
    key = (device, dtype)
    if key not in _TABLES:
        bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        _TABLES[key] = torch.zeros((256, 8), dtype=dtype, device=device).masked_fill_(
            bits == 0, float("-inf")
        )
    return _TABLES[key]


def apply_logit_constraints(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """``logits`` (B, V), one row per request, with the biases added and the grammars' masks applied."""
    biased = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
    constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not biased and not constrained:
        return logits
    out = logits
    if biased:
        out = logits.clone()
        add_logit_bias_(out, biased, [requests[i].sampling_params.logit_bias for i in biased])
    if constrained:
        out = mask_disallowed(out, constrained, [requests[i].grammar for i in constrained], out is logits)
    return out


def add_logit_bias_(x: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    """Add ``biases[k]`` to row ``rows[k]`` of ``x`` (B, V), in place, in one ``index_put_``."""
    r: list[int] = []
    c: list[int] = []
    v: list[float] = []
    for row, bias in zip(rows, biases, strict=True):
        r += [row] * len(bias)
        c += bias.keys()
        v += bias.values()
    dev = x.device
    index = (torch.tensor(r, dtype=torch.long, device=dev), torch.tensor(c, dtype=torch.long, device=dev))
    x.index_put_(index, torch.tensor(v, dtype=x.dtype, device=dev), accumulate=True)


def additive_mask(packed: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(G, vocab): 0 for the allowed tokens of a (G, W) int32 bitmask (bit ``t % 32`` of word ``t // 32``),
    -inf for the others and for tokens past its ``32 W`` bits."""
    g, words = packed.shape
    # little-endian words: token t is bit t % 8 of byte t // 8, on a CPU as on a GPU
    as_bytes = packed.contiguous().view(torch.uint8).reshape(-1).long()  # (G * 4W,)
    mask = _byte_table(packed.device, dtype).index_select(0, as_bytes).view(g, words * 32)  # (G, 32 W)
    if words * 32 >= vocab:
        return mask[:, :vocab]
    pad = torch.full((g, vocab - words * 32), float("-inf"), dtype=dtype, device=packed.device)
    return torch.cat([mask, pad], dim=1)


def allowed_tokens(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """(G, vocab) bool: the tokens a (G, W) int32 bitmask allows."""
    return additive_mask(packed, vocab) == 0


def mask_disallowed(x: torch.Tensor, rows: list[int], grammars: list[Grammar], keep: bool) -> torch.Tensor:
    """``x`` (B, V) with the tokens of row ``rows[k]`` that ``grammars[k]`` does not allow next at -inf:
    a new tensor when ``keep`` (``x`` is the caller's), else ``x`` itself, changed in place."""
    packed = fill_bitmask(grammars).to(x.device, non_blocking=True)  # (G, W)
    mask = additive_mask(packed, x.shape[1], x.dtype)  # (G, V)
    if len(rows) == x.shape[0]:
        return x + mask if keep else x.add_(mask)
    index = torch.tensor(rows, dtype=torch.long, device=x.device)
    return x.index_add(0, index, mask) if keep else x.index_add_(0, index, mask)
