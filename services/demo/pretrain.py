"""Stage 0 of the demo training: the vision tower learns the task's visual vocabulary first.

Trained from scratch through the language model, the ViT learns colours within a few dozen steps but
shapes not at all in a thousand: the answer's gradient reaches it diluted by attention over hundreds of
image tokens, and a shape is a property of a region of 10-15 patches, not of one patch. A linear probe
on mean-pooled features learned shapes slowly too. So, as real vision encoders are pretrained before they
meet a language model, this stage trains the InternViT alone with a throwaway per-patch linear head that
predicts, for every patch of a tile, which shape covers it (or none) and its colour (or none, or
checkerboard). Dense labels come from the rendered pixels themselves. The head is discarded; only the
vision tower's weights carry over into the InternVL model.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
from torch import nn

from services.demo import task
from services.demo.grounding import CHECKER, NUM_SHAPES, tile_label_maps
from services.demo.inputs import reference_pixels

BATCH = 16
# a corners image gives four tiles, the others one: these weights give each kind about a third of the tiles
KIND_WEIGHTS = {"single": 1.0, "multi": 1.0, "corners": 0.25}
SHAPE_CLASS_WEIGHTS = (0.2, 1.0, 1.0, 1.0, 1.0)  # background patches are 80-95% of a tile


def sincos_position_embeddings(tower) -> None:
    """Set ``tower``'s absolute position embeddings to a fixed 2-D sine-cosine table (they stay trainable).

    transformers initialises InternViT's position embeddings to zeros (OpenGVLab's code: standard normal
    noise): a tower trained from scratch then starts with no notion of where a patch is, and attention
    cannot prefer a patch's neighbours until one is learned. This table gives every patch its row and
    column from the first step, as MAE's fixed table does. The class token's row stays zero.
    """
    table = tower.embeddings.position_embeddings
    n, dim = math.isqrt(table.shape[1] - 1), table.shape[2]
    grid = torch.arange(n, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    quarter = dim // 4
    freqs = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    values = torch.zeros(table.shape[1:])
    values[1:, : 4 * quarter] = torch.cat(parts, dim=1)
    with torch.no_grad():
        table.copy_(values[None])


def _at_patches(labels: np.ndarray, patch: int) -> np.ndarray:
    centres = np.arange(patch // 2, 448, patch)  # the centre pixel of each patch of a 448 tile
    return labels[np.ix_(centres, centres)].reshape(-1).astype(np.int64)


def examples(rng: random.Random, patch: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tile, shape label per patch, colour label per patch) from one generated image: a single tile, a
    multi-tile image's thumbnail, or the four tiles of a corners image."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "corners":
        img, shapes = task.corners(rng)
        sample = task.Sample(img, "", "", kind, "corner", tuple(shapes))
        keep = range(4)  # the thumbnail shows none of them
    else:
        grid = (1, 1) if kind == "single" else rng.choice([(2, 2), (2, 1), (1, 2)])
        img, items = task.scene(rng, grid)
        sample = task.Sample(img, "", "", kind, "", tuple(items))
        keep = (-1,)  # the 448 view of the whole image: the tile of a 1x1 image, else the thumbnail
    tiles = reference_pixels(img)
    shape_maps, colour_maps = tile_label_maps(sample)
    return [(tiles[i], _at_patches(shape_maps[i], patch), _at_patches(colour_maps[i], patch)) for i in keep]


def batch(rng: random.Random, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    while len(items) < BATCH:
        items.extend(examples(rng, patch))
    items = items[:BATCH]
    return tuple(torch.from_numpy(np.stack([it[k] for it in items])) for k in range(3))  # type: ignore[return-value]


def pretrain_vision(vision_tower, steps: int, seed: int, lr: float = 3e-3, log=print, record=None) -> None:
    """Train ``vision_tower`` in place for ``steps`` steps of :data:`BATCH` tiles."""
    torch.manual_seed(seed)
    hidden = vision_tower.config.hidden_size
    shape_head, colour_head = nn.Linear(hidden, NUM_SHAPES + 1), nn.Linear(hidden, CHECKER + 1)
    params = [*vision_tower.parameters(), *shape_head.parameters(), *colour_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    weights = torch.tensor(SHAPE_CLASS_WEIGHTS)
    patch = vision_tower.config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    vision_tower.train()
    started = time.monotonic()
    recent: list[float] = []
    for step in range(steps):
        x, shape, colour = batch(random.Random(f"{seed}:vision:{step}"), patch)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (0.3 if step >= 0.8 * steps else 1.0)
        feats = vision_tower(pixel_values=x).last_hidden_state[:, 1:]  # (B, patches, hidden), CLS dropped
        shape_logits, colour_logits = shape_head(feats), colour_head(feats)
        loss = nn.functional.cross_entropy(
            shape_logits.flatten(0, 1), shape.flatten(), weight=weights
        ) + nn.functional.cross_entropy(colour_logits.flatten(0, 1), colour.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            on_shape = shape > 0
            acc = float((shape_logits.argmax(-1)[on_shape] == shape[on_shape]).float().mean())
        recent.append(acc)
        if record is not None:
            record({"stage": "vision", "step": step, "loss": round(loss.item(), 4), "shape_patch_acc": acc})
        if step % 25 == 24 or step + 1 == steps:
            log(
                f"vision step {step + 1}/{steps} {time.monotonic() - started:.0f}s loss {loss.item():.3f} "
                f"shape accuracy on shape patches {np.mean(recent[-25:]):.2f}"
            )
    vision_tower.eval()
