"""Stage 1's images, seen through the frozen vision tower once.

After stage 0 the tower is frozen, so what it makes of an image never changes. Stage 1 therefore renders
a fixed, seeded pool of images once, runs the tower over their reference tiles once, keeps its output
(float16), and trains the projector and the language model on the stored output: a step then costs the
language model alone (about 0.25 s instead of 1.3 s for 24 tiles on two CPU cores), so the same hours
buy about five times the steps. The questions about a pooled image are drawn afresh each time it is
used (``task.training_questions``). While training, :func:`stored_features` stands in for the tower:
the stored output goes in where pixels would, and transformers' own code does the rest (pixel shuffle,
projector, placement of the image tokens), so what is trained is what ``generate`` runs.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from services.demo.grounding import token_labels
from services.demo.inputs import reference_pixels
from services.demo.task import Sample, make_sample

# the share of the pool's tiles per kind, and each kind's tiles per image (multi: 5 or 3, on average 4)
TILE_SHARE = {"single": 0.4, "multi": 0.3, "corners": 0.3}
TILES_PER_IMAGE = {"single": 1, "multi": 4, "corners": 5}
TOWER_BATCH = 32  # tiles per forward pass of the tower


@dataclass
class PoolImage:
    sample: Sample  # without its image: what it shows (``task.training_questions`` asks about it)
    features: np.ndarray  # (T, 1 + patches, hidden) float16: the tower's last hidden state, CLS first
    grounding: np.ndarray  # (3, T, tokens per tile) int8: shape, colour and tile slot of every image token


def render(rng: random.Random, side: int):
    """One pool image: the sample (without its image), its reference tiles and grounding labels."""
    weights = {k: TILE_SHARE[k] / TILES_PER_IMAGE[k] for k in TILE_SHARE}
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    sample = make_sample(rng, kind)
    grounding = np.stack(token_labels(sample, side)).astype(np.int8)
    return dataclasses.replace(sample, image=None), reference_pixels(sample.image), grounding


@torch.no_grad()
def build_pool(tower, seed: int, tiles: int, side: int, log=print) -> list[PoolImage]:
    """At least ``tiles`` tiles of images ``f"{seed}:pool:{i}"``, through ``tower`` (in eval mode)."""
    rendered: queue.Queue = queue.Queue(maxsize=64)
    stop = threading.Event()

    def produce():  # Pillow and numpy release the GIL: rendering overlaps the tower's forward passes
        i = 0
        while not stop.is_set():
            item = render(random.Random(f"{seed}:pool:{i}"), side)
            i += 1
            while not stop.is_set():
                try:
                    rendered.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue

    threading.Thread(target=produce, daemon=True, name="demo-pool").start()
    tower.eval()
    pool: list[PoolImage] = []
    total, next_log, started = 0, 0, time.monotonic()
    try:
        while total < tiles:
            pending, count = [], 0
            while count < min(TOWER_BATCH, tiles - total):
                pending.append(rendered.get())
                count += len(pending[-1][1])
            pixels = torch.from_numpy(np.concatenate([p[1] for p in pending]))
            out = tower(pixel_values=pixels).last_hidden_state.to(torch.float16).numpy()
            at = 0
            for sample, px, grounding in pending:
                pool.append(PoolImage(sample, out[at : at + len(px)].copy(), grounding))
                at += len(px)
            total += at
            if total >= next_log:
                log(f"pool: {total}/{tiles} tiles, {len(pool)} images, {time.monotonic() - started:.0f}s")
                next_log += 2000
    finally:
        stop.set()
    return pool


class _StoredOutput(nn.Module):
    """Stands in for the vision tower: its "pixels" are the tower's stored output."""

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=pixel_values)


@contextmanager
def stored_features(model) -> Iterator[None]:
    """Within the block ``model`` takes the vision tower's stored output as ``pixel_values``."""
    tower = model.model.vision_tower
    model.model.vision_tower = _StoredOutput()
    try:
        yield
    finally:
        model.model.vision_tower = tower
