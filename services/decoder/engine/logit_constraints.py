"""What a request imposes on its logits before temperature and filters: ``logit_bias`` and a grammar.

``apply_logit_constraints`` is the sampler's one call between the penalties and the draw. The rows with
a ``logit_bias`` get their biases added by one ``index_put_`` for the whole batch; the rows with a
grammar (``Request.grammar``, ``engine.structured``) get the tokens it does not allow next set to -inf,
from a packed bitmask (32 tokens to an int32) that llguidance fills for all of them in one call and that
tensor ops unpack on the logits' device: no Python loop over the vocabulary. Bias first, so a bias can
never bring back a token the grammar forbids. A batch with neither returns its logits untouched (the
same tensor); otherwise the result is a new tensor and the input is left as it was (the sampler takes
the log-probabilities from it).
"""

from __future__ import annotations

import torch

from services.decoder.engine.request import Request
from services.decoder.engine.structured import Grammar, fill_bitmask

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    """(32,) int32: 0..31, the bit of each token within its word."""
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return _SHIFTS[device]


def apply_logit_constraints(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """``logits`` (B, V), one row per request, with the biases added and the grammars' masks applied."""
    biased = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
    constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not biased and not constrained:
        return logits
    out = logits.clone()
    if biased:
        add_logit_bias_(out, biased, [requests[i].sampling_params.logit_bias for i in biased])
    if constrained:
        mask_disallowed_(out, constrained, [requests[i].grammar for i in constrained])
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


def allowed_tokens(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """(G, vocab) bool from a (G, W) int32 bitmask (bit ``t % 32`` of word ``t // 32``); tokens past
    the mask's ``32 W`` bits are not allowed."""
    g, words = packed.shape
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1  # (G, W, 32)
    allowed = bits.view(g, words * 32).bool()  # (G, 32 W)
    if words * 32 >= vocab:
        return allowed[:, :vocab]
    pad = torch.zeros((g, vocab - words * 32), dtype=torch.bool, device=packed.device)
    return torch.cat([allowed, pad], dim=1)


def mask_disallowed_(x: torch.Tensor, rows: list[int], grammars: list[Grammar]) -> None:
    """Set to -inf, in place, the tokens of row ``rows[k]`` of ``x`` (B, V) that ``grammars[k]``
    does not allow next."""
    packed = fill_bitmask(grammars).to(x.device, non_blocking=True)  # (G, W)
    allowed = allowed_tokens(packed, x.shape[1])  # (G, V)
    index = torch.tensor(rows, dtype=torch.long, device=x.device)
    x.index_copy_(0, index, x.index_select(0, index).masked_fill_(~allowed, float("-inf")))
