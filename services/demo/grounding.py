"""What each image token of a demo sample shows: the labels of the grounding objective of stage 1.

Stage 1 trains the language model on answers, and beside them on a throwaway linear head that reads,
from the language model's hidden state at every image token (after :data:`GROUNDING_LAYER` layers),
which shape covers that token's 56 x 56 pixel block, its colour, and which tile of the request the token
belongs to. The grid tiles of a multi-tile scene get a tile slot but no shape or colour label: they
show pieces of shapes, and which shape a piece belongs to is the thumbnail's to say (the mutation
tests drop the thumbnail and expect those answers to go). Answers alone taught the model to read an image of one shape, but not to bind: asked for
the colour of the triangle among two shapes it answered at chance. With these labels every image token
carries its own shape and colour together (the binding), and its tile (the corner questions' address),
and the answer only has to look them up.

Labels come from the rendered pixels and the reference tiling (``services.demo.reference``): the label
maps are resized and cropped exactly as the image is, so token ``k`` of tile ``t`` is labelled with what
the model sees there. The pixel shuffle of transformers' InternVL (``ps_version`` v2) keeps tokens in
row-major order of the tile's blocks.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from services.demo import task
from services.demo.reference import dynamic_preprocess

NUM_SHAPES = len(task.SHAPES)
COLOUR_NAMES = list(task.COLOURS)
CHECKER = len(COLOUR_NAMES) + 1  # the "colour" of a corners image's checkerboard shapes
WHOLE = 12  # the tile slot of a view of the whole image: the one tile of a 1x1 image, or the thumbnail
SLOTS = WHOLE + 1
MIN_COVER = 0.2  # a block shows a shape when the shape covers at least this share of it
UNLABELLED = -1  # no shape or colour label (the tile slot is always labelled)


def label_maps(sample: task.Sample) -> tuple[Image.Image, Image.Image]:
    """Per-pixel shape (0: none, else 1 + index in SHAPES) and colour (0: none, 1 + index in COLOURS, or
    CHECKER) of the sample's image, as 8-bit images of its size."""
    pixels = np.asarray(sample.image)
    shape_map = np.zeros(pixels.shape[:2], np.uint8)
    colour_map = np.zeros(pixels.shape[:2], np.uint8)
    if sample.kind == "corners":
        inside = pixels[:, :, 0] != 128  # the checkerboard; the background is flat grey
        half = task.CORNER_SIZE // 2
        for i, shape in enumerate(sample.layout):
            ox, oy = (i % 2) * half, (i // 2) * half
            quadrant = inside[oy : oy + half, ox : ox + half]
            shape_map[oy : oy + half, ox : ox + half][quadrant] = 1 + task.SHAPES.index(shape)
        colour_map[shape_map > 0] = CHECKER
    else:
        for shape, colour, *_ in sample.layout:  # drawn without antialiasing: exact colours
            inside = (pixels == np.array(task.COLOURS[colour])).all(-1)
            shape_map[inside] = 1 + task.SHAPES.index(shape)
            colour_map[inside] = 1 + COLOUR_NAMES.index(colour)
    return Image.fromarray(shape_map), Image.fromarray(colour_map)


def tile_label_maps(sample: task.Sample) -> tuple[np.ndarray, np.ndarray]:
    """The label maps cut like the image by the reference tiling (nearest-neighbour resizes): two
    (T, 448, 448) uint8 arrays, tiles in the reference's order, the thumbnail last."""
    shape_map, colour_map = label_maps(sample)
    cut = [dynamic_preprocess(_Nearest(m), 1, 12, 448, use_thumbnail=True) for m in (shape_map, colour_map)]
    return tuple(np.stack([np.asarray(t) for t in tiles]) for tiles in cut)  # type: ignore[return-value]


class _Nearest:
    """An image whose ``resize`` is nearest-neighbour: labels must not be blended by the reference's
    bicubic resize. ``dynamic_preprocess`` uses only ``size``, ``resize`` and ``crop``."""

    def __init__(self, image: Image.Image):
        self.image = image
        self.size = image.size

    def resize(self, size):
        return _Nearest(self.image.resize(size, Image.NEAREST))

    def crop(self, box):
        return self.image.crop(box)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.image, dtype=dtype)


def token_labels(sample: task.Sample, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape, colour and tile-slot label of every image token: three (T, side * side) int64 arrays for a
    request whose tiles each become ``side`` x ``side`` tokens (row-major blocks of the tile)."""
    shapes, colours = tile_label_maps(sample)
    t, block = len(shapes), 448 // side
    # (T, side, side, block * block): the pixels of each token's block
    blocks = [
        m.reshape(t, side, block, side, block).transpose(0, 1, 3, 2, 4).reshape(t, side * side, -1)
        for m in (shapes, colours)
    ]
    counts = np.stack([(blocks[0] == k).sum(-1) for k in range(1, NUM_SHAPES + 1)], axis=-1)
    best = counts.argmax(-1)
    shown = counts.max(-1) >= MIN_COVER * block * block
    shape = np.where(shown, best + 1, 0)
    colour = np.zeros_like(shape)
    for k in range(1, NUM_SHAPES + 1):  # the colour of the shape the block shows
        mine = shape == k
        if mine.any():
            hits = np.where(blocks[0] == k, blocks[1], 0).max(-1)  # one colour per shape
            colour[mine] = hits[mine]
    if sample.kind == "corners":  # the thumbnail averages the checkerboard to the background's grey
        shape[-1] = colour[-1] = 0
    elif t > 1:  # a scene's grid tiles show pieces of shapes: what they are is for the thumbnail to say
        shape[:-1] = colour[:-1] = UNLABELLED
    slot = np.repeat(np.arange(t)[:, None], side * side, axis=1)
    slot[-1] = WHOLE  # the thumbnail, or the only tile
    return shape.astype(np.int64), colour.astype(np.int64), slot.astype(np.int64)


def pointer_targets(question: str, labels: np.ndarray) -> np.ndarray | None:
    """The image tokens that hold the answer to ``question``, given the image's grounding ``labels``
    ((3, tokens): shape, colour, slot per image token): the named shape's tokens for a colour question,
    the named colour's for a shape question, the shape's in the named corner's tile. None for a count
    (every shape counts) or when no token is labelled with the subject."""
    qtype, subject = task.parse_question(question)
    shape, colour, slot = labels
    if qtype == "colour":
        hit = shape == 1 + task.SHAPES.index(subject)
    elif qtype == "shape":
        hit = colour == 1 + COLOUR_NAMES.index(subject)
    elif qtype == "corner":
        hit = (slot == task.CORNERS.index(subject)) & (shape > 0)
    else:
        return None
    return hit if hit.any() else None
