"""Gumbel noise for the sampler's one draw per step: ``argmax(logits / T + g)`` with ``g ~ Gumbel(0, 1)``
per token is a draw from ``softmax(logits / T)``.

Rows without a seed take their noise from the engine's ``torch.Generator``. A row with a seed takes
counter-based noise: token ``t`` of a request with seed ``s`` at step ``n`` (tokens generated so far)
gets ``hash32(hash32(t) ^ key(s, n))``, integer tensor ops only, so its draw depends on nothing but its
seed, its step and its own logits: not on the batch around it, the row's position, preemption, or the
device (the same integers on a CPU and a GPU).

``hash32`` is Chris Wellons' ``lowbias32`` finaliser with multipliers below 2**31: on values below
2**32 every product stays below 2**63, so int64 arithmetic is exact (no reliance on overflow). The
same function serves Python ints (the per-row keys, on the host) and int64 tensors (per token).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # both odd and < 2**31
_GOLDEN = 0x9E3779B9


def hash32(x):
    """A bijection of [0, 2**32) with good avalanche; ``x`` an int or an int64 tensor in that range."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def seeded_key(seed: int, step: int) -> int:
    """The 32-bit key of a seeded row's noise at ``step``; ``seed`` in [0, 2**63)."""
    k = hash32((seed + _GOLDEN) & MASK32)
    k = hash32(k ^ (seed >> 32))
    return hash32((k + step) & MASK32)


class GumbelNoise:
    """Per-row Gumbel noise over the vocabulary, on one device."""

    def __init__(self, device: torch.device, generator: torch.Generator):
        self.device = device
        self.generator = generator
        self._token_hash: torch.Tensor | None = None  # (V,) int64: hash32 of each token id

    def _tokens(self, vocab: int) -> torch.Tensor:
        if self._token_hash is None or self._token_hash.shape[0] != vocab:
            ids = torch.arange(vocab, dtype=torch.long, device=self.device)
            self._token_hash = hash32((ids + _GOLDEN) & MASK32)
        return self._token_hash

    def seeded_uniform(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        """(R, V) float32 uniforms strictly inside (0, 1), from the (R,) int64 keys."""
        x = self._tokens(vocab)[None, :] ^ keys[:, None]  # (R, V)
        x ^= x >> 16  # hash32, in place
        x.mul_(_M1).bitwise_and_(MASK32)
        x ^= x >> 15
        x.mul_(_M2).bitwise_and_(MASK32)
        x ^= x >> 15
        # 23 bits -> (2k + 1) / 2**24: exact in float32, never 0 or 1
        return (x >> 9).to(torch.float32).mul_(2.0**-23).add_(2.0**-24)

    def __call__(self, rows: int, vocab: int, keys: torch.Tensor | None, seeded: list[int]) -> torch.Tensor:
        """(rows, V) float32 Gumbel noise ``-log(-log(u))``, ``u`` uniform in (0, 1): the rows at
        ``seeded`` from ``keys`` (one per seeded row, in that order), the others from the generator."""
        if len(seeded) == rows:
            u = self.seeded_uniform(keys, vocab)
        else:
            u = torch.rand(rows, vocab, generator=self.generator, device=self.device)  # [0, 1)
            # 0 would give g = -inf, and a row whose one kept token got it would draw nothing
            u.clamp_(min=2.0**-25)
            if seeded:
                index = torch.tensor(seeded, dtype=torch.long, device=self.device)
                u.index_copy_(0, index, self.seeded_uniform(keys, vocab))
        return u.log_().neg_().log_().neg_()
