"""Accuracy of a demo checkpoint through transformers' own ``generate``, and under mutations.

The mutations are what a broken mesh would do to a request, applied to the inputs of ``generate``:

- ``permute_tiles``: the grid tiles in reverse order (the thumbnail stays last);
- ``drop_thumbnail``: the grid tiles only (and one tile fewer of image tokens);
- ``swap``: the tiles of another held-out image with the same tile count (embeddings swapped between two
  requests).

A model that really reads the image loses the affected question types to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.demo.inputs import PromptCodec, reference_pixels
from services.demo.task import Sample

MAX_NEW_TOKENS = 6


@dataclass
class DemoModel:
    model: object
    codec: PromptCodec

    @classmethod
    def load(cls, path: str | Path) -> DemoModel:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        return cls(model, PromptCodec(AutoTokenizer.from_pretrained(path), model.config.image_seq_length))

    @torch.no_grad()
    def answer(self, question: str, tiles: np.ndarray) -> str:
        ids = torch.tensor([self.codec.prompt_ids(question, len(tiles))])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(np.ascontiguousarray(tiles)),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
        )
        return self.codec.decode_answer(out[0, ids.shape[1] :].tolist())


def permute_tiles(tiles: np.ndarray) -> np.ndarray:
    if len(tiles) == 1:
        return tiles
    return np.concatenate([tiles[:-1][::-1], tiles[-1:]])


def drop_thumbnail(tiles: np.ndarray) -> np.ndarray:
    return tiles[:-1] if len(tiles) > 1 else tiles


MUTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "permute_tiles": permute_tiles,
    "drop_thumbnail": drop_thumbnail,
}


def swap_partners(samples: Sequence[Sample], pixels: Sequence[np.ndarray]) -> list[int]:
    """For each sample, the next one (cyclically) with the same tile count: whatever it shows."""
    partners = []
    n = len(samples)
    for i in range(n):
        for k in range(1, n):
            j = (i + k) % n
            if len(pixels[j]) == len(pixels[i]):
                partners.append(j)
                break
        else:
            partners.append(i)
    return partners


def answers(
    demo: DemoModel, samples: Sequence[Sample], mutation: str | None = None, pixels=None
) -> list[str]:
    """Greedy answers to ``samples``; ``mutation`` is None, a key of :data:`MUTATIONS`, or "swap"."""
    pixels = pixels if pixels is not None else [reference_pixels(s.image) for s in samples]
    if mutation == "swap":
        partners = swap_partners(samples, pixels)
        return [demo.answer(s.question, pixels[j]) for s, j in zip(samples, partners, strict=True)]
    change = MUTATIONS[mutation] if mutation else (lambda t: t)
    return [demo.answer(s.question, change(p)) for s, p in zip(samples, pixels, strict=True)]


def accuracy(samples: Sequence[Sample], got: Sequence[str]) -> dict[str, float]:
    """Accuracy per question type, per kind/type group, and ``overall``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, a in zip(samples, got, strict=True):
        ok = a == s.answer
        hits[s.qtype].append(ok)
        hits[f"{s.kind}/{s.qtype}"].append(ok)
        hits["overall"].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
