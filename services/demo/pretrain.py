"""Stage 0 of the demo training: the vision tower learns the task's visual vocabulary first.

A ViT trained from scratch through the language model learns colours in a few dozen steps but shapes
hardly at all in a thousand: the answer's gradient reaches the vision tower diluted by attention over
hundreds of image tokens, and a shape is a property of a whole region, not of a patch. So, as real
vision encoders are pretrained before they meet a language model, this stage trains the InternViT alone
with a throwaway linear head on its mean-pooled patch features, to predict per tile:

- for each shape, its colour or "absent" (4 x 5 classes: recognition and binding in one);
- how many shapes (0-4);
- which checkerboard shape the tile holds, if any (the corner images' quadrants).

The head is discarded; only the vision tower's weights carry over into the InternVL model.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from torch import nn

from services.demo import task
from services.demo.inputs import reference_pixels

NUM_SHAPES = len(task.SHAPES)
COLOUR_NAMES = list(task.COLOURS)
IGNORE = -100
BATCH = 16


def _scene_labels(items) -> list[int]:
    colour_of = [0] * NUM_SHAPES
    for shape, colour, *_ in items:
        colour_of[task.SHAPES.index(shape)] = 1 + COLOUR_NAMES.index(colour)
    return [*colour_of, len(items), 0]


def examples(rng: random.Random) -> list[tuple[np.ndarray, list[int]]]:
    """Labelled tiles from one generated image: a single tile, a multi-tile thumbnail, or 4 corner tiles."""
    kind = rng.choice(task.KINDS)
    if kind == "corners":
        img, shapes = task.corners(rng)
        tiles = reference_pixels(task.Sample(img, "", "", kind, ""))
        return [
            (tiles[i], [IGNORE] * NUM_SHAPES + [IGNORE, 1 + task.SHAPES.index(shapes[i])]) for i in range(4)
        ]
    grid = (1, 1) if kind == "single" else rng.choice([(2, 2), (2, 1), (1, 2)])
    img, items = task.scene(rng, grid)
    tiles = reference_pixels(task.Sample(img, "", "", kind, ""))
    return [(tiles[-1], _scene_labels(items))]  # the single tile, or the thumbnail


def batch(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    items: list[tuple[np.ndarray, list[int]]] = []
    while len(items) < BATCH:
        items.extend(examples(rng))
    items = items[:BATCH]
    return torch.from_numpy(np.stack([t for t, _ in items])), torch.tensor([y for _, y in items])


class ProbeHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.colour_of = nn.Linear(hidden, NUM_SHAPES * 5)
        self.count = nn.Linear(hidden, 5)
        self.checker = nn.Linear(hidden, NUM_SHAPES + 1)

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        b = pooled.shape[0]
        return [
            *self.colour_of(pooled).view(b, NUM_SHAPES, 5).unbind(1),
            self.count(pooled),
            self.checker(pooled),
        ]


def pretrain_vision(vision_tower, steps: int, seed: int, lr: float = 3e-3, log=print, record=None) -> None:
    """Train ``vision_tower`` in place for ``steps`` steps of :data:`BATCH` tiles."""
    torch.manual_seed(seed)
    head = ProbeHead(vision_tower.config.hidden_size)
    params = list(vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    vision_tower.train()
    started = time.monotonic()
    recent: list[list[float]] = []
    for step in range(steps):
        rng = random.Random(f"{seed}:vision:{step}")
        x, y = batch(rng)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.2 if step >= 0.8 * steps else 1.0)
        pooled = vision_tower(pixel_values=x).last_hidden_state[:, 1:].mean(1)
        outs = head(pooled)
        losses = [nn.functional.cross_entropy(o, y[:, i], ignore_index=IGNORE) for i, o in enumerate(outs)]
        losses = [v for v in losses if torch.isfinite(v)]  # a batch may lack a head's labels
        loss = sum(losses) / len(losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            accs = []
            for lo, hi in ((0, NUM_SHAPES), (NUM_SHAPES, NUM_SHAPES + 1), (NUM_SHAPES + 1, NUM_SHAPES + 2)):
                pred = torch.stack([outs[i].argmax(-1) for i in range(lo, hi)], 1)
                mask = y[:, lo:hi] != IGNORE
                accs.append(float((pred == y[:, lo:hi])[mask].float().mean()) if mask.any() else float("nan"))
        recent.append(accs)
        if record is not None:
            record({"stage": "vision", "step": step, "loss": round(loss.item(), 4), "acc": accs})
        if step % 25 == 24 or step + 1 == steps:
            window = np.array(recent[-25:])
            colour_of, count, checker = np.nanmean(window, axis=0)
            log(
                f"vision step {step + 1}/{steps} {time.monotonic() - started:.0f}s loss {loss.item():.3f} "
                f"acc: colour-of-shape {colour_of:.2f} count {count:.2f} checker {checker:.2f}"
            )
    vision_tower.eval()
