"""The synthetic visual task the demo model is trained on, generated on the fly with Pillow from a seed.

Three kinds of image, each tiled by the reference InternVL tiling (``services.demo.reference``):

- ``single``: one 448 tile (square-ish, 320-600 px). One to four bold shapes, each a different shape in a
  different colour, on a light background. Questions: the colour of a named shape, the shape of a named
  colour, how many shapes.
- ``multi``: 2x2, 2x1 or 1x2 tiles plus the thumbnail. The same questions, but every shape is centred on a
  tile boundary, so each tile holds only pieces of shapes (a circle cut in four looks like four quarter
  discs, and counting pieces over-counts): the whole shapes are only in the thumbnail.
- ``corners``: exactly 896 x 896, so the reference tiling cuts it 2x2 at full resolution. A different
  shape sits in each quadrant, drawn as a one-pixel black-and-white checkerboard on mid-grey. The
  thumbnail halves the resolution and the checkerboard averages to the grey of the background, so the
  shapes are invisible there: the answer to "what shape is in the top left corner?" exists only in the
  right tile, and the model has to know the tiles' order.

Every question has a one-word answer from a closed vocabulary (:data:`ANSWERS`). Design notes (what the
training needed) are in ``docs/demo-model.md``.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from services.demo.reference import reference_grid

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three", "four")
ANSWERS = (*COLOURS, *SHAPES, *COUNT_WORDS)

KINDS = ("single", "multi", "corners")
QUESTION_TYPES = ("colour", "shape", "count", "corner")
CORNER_SIZE = 896  # 2 x 448: the reference tiling crops it without resampling
SHAPE_RADIUS = 0.13  # of sqrt(width x height): the shapes of single and multi scenes
CORNER_SHAPE_RADIUS = 0.36  # of a quadrant's side: the shapes of corners images


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    qtype: str
    layout: tuple = ()  # (shape, colour, cx, cy, r) per shape of a scene; (shape,) per quadrant of corners

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def question_for(qtype: str, subject: str = "") -> str:
    if qtype == "colour":
        return f"What colour is the {subject}?"
    if qtype == "shape":
        return f"What shape is the {subject} one?"
    if qtype == "count":
        return "How many shapes are there?"
    if qtype == "corner":
        return f"What shape is in the {subject} corner?"
    raise ValueError(f"unknown question type {qtype!r}")


def parse_question(question: str) -> tuple[str, str]:
    """(question type, subject) of a question :func:`question_for` wrote."""
    for qtype in QUESTION_TYPES:
        parts = question_for(qtype, "\0").split("\0")
        if len(parts) == 1 and question == parts[0]:
            return qtype, ""
        if len(parts) == 2 and question.startswith(parts[0]) and question.endswith(parts[1]):
            return qtype, question[len(parts[0]) : len(question) - len(parts[1])]
    raise ValueError(f"not a question of the task: {question!r}")


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` inside the circle (cx, cy, r); None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.75
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a))) for a in (90, 210, 330)
        ]
    if shape == "cross":
        a, w = r * 0.95, r * 0.25
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(225, 250)
    return tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3))


def _size_for_grid(rng: random.Random, grid: tuple[int, int]) -> tuple[int, int]:
    """A random image size the reference tiling maps to ``grid`` (columns, rows)."""
    for _ in range(1000):
        if grid == (1, 1):
            side = rng.randint(320, 600)
            w, h = side, round(side * rng.uniform(0.92, 1.08))
        elif grid == (2, 2):
            side = rng.randint(700, 940)
            w, h = side, round(side * rng.uniform(0.96, 1.04))
        elif grid == (2, 1):
            h = rng.randint(340, 560)
            w = round(h * rng.uniform(1.9, 2.1))
        elif grid == (1, 2):
            w = rng.randint(340, 560)
            h = round(w * rng.uniform(1.9, 2.1))
        else:
            raise ValueError(f"no sizes for grid {grid}")
        if reference_grid(w, h) == grid:
            return w, h
    raise RuntimeError(f"could not draw a size for grid {grid}")


def _place(rng: random.Random, n: int, propose) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping circles from ``propose()``; restarts until they fit."""
    for _ in range(500):
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(200):
                cx, cy, r = propose()
                if all(math.hypot(cx - x, cy - y) > r + q + 6 for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} shapes")


def scene(
    rng: random.Random, grid: tuple[int, int], max_shapes: int | None = None
) -> tuple[Image.Image, list[tuple]]:
    w, h = _size_for_grid(rng, grid)
    n = rng.randint(1, min(4 if grid in ((1, 1), (2, 2)) else 2, max_shapes or 4))
    # One size for every shape: the same area in the 448 view of every grid (the tile of a 1x1 image, the
    # thumbnail of the others), so area tells shapes apart as well as outline does.
    r = SHAPE_RADIUS * math.sqrt(w * h)

    if grid == (1, 1):

        def propose():
            return rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4), r
    else:
        # every centre on a tile boundary (up to a quarter radius off it), so no tile holds a whole shape

        def propose():
            jitter = rng.uniform(-0.25, 0.25) * r
            if grid == (2, 1) or (grid == (2, 2) and rng.random() < 0.5):
                cx, cy = w / 2 + jitter, rng.uniform(r + 4, h - r - 4)
            else:
                cx, cy = rng.uniform(r + 4, w - r - 4), h / 2 + jitter
            return cx, cy, r

    circles = _place(rng, n, propose)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    img = Image.new("RGB", (w, h), _background(rng))
    draw = ImageDraw.Draw(img)
    for (cx, cy, r), shape, colour in zip(circles, shapes, colours, strict=True):
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return img, [(s, c, *xyr) for s, c, xyr in zip(shapes, colours, circles, strict=True)]


def corners(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """Four checkerboard shapes, one per quadrant, in CORNERS order; invisible in the thumbnail.

    The shape mask is drawn at half resolution and doubled, so every 2 x 2 block is all checkerboard or
    all grey: the reference thumbnail (a 2x bicubic downscale) then stays within 3 levels of the grey
    everywhere, outlines included.
    """
    s = CORNER_SIZE
    half = s // 2
    mask = Image.new("L", (half, half), 0)
    draw = ImageDraw.Draw(mask)
    shapes = rng.sample(SHAPES, 4)
    q = half // 2  # a quadrant at half resolution
    for i, shape in enumerate(shapes):
        ox, oy = (i % 2) * q, (i // 2) * q
        r = q * CORNER_SHAPE_RADIUS
        cx = ox + q / 2 + rng.uniform(-0.06, 0.06) * q
        cy = oy + q / 2 + rng.uniform(-0.06, 0.06) * q
        draw_shape(draw, shape, cx, cy, r, 255)
    inside = np.asarray(mask).repeat(2, axis=0).repeat(2, axis=1) > 127
    yy, xx = np.mgrid[0:s, 0:s]
    checker = np.where((xx + yy) % 2 == 0, 0, 255).astype(np.uint8)
    pixels = np.where(inside, checker, np.uint8(128))
    return Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2), "RGB"), shapes


def make_sample(
    rng: random.Random, kind: str, qtype: str | None = None, max_shapes: int | None = None
) -> Sample:
    """One image with one question of ``qtype`` (random among the kind's types when None); scenes have at
    most ``max_shapes`` shapes when given (a training curriculum)."""
    if kind == "corners":
        img, shapes = corners(rng)
        i = rng.randrange(4)
        return Sample(img, question_for("corner", CORNERS[i]), shapes[i], kind, "corner", tuple(shapes))
    if kind == "single":
        grid = (1, 1)
    elif kind == "multi":
        grid = rng.choice([(2, 2), (2, 2), (2, 1), (1, 2)])
    else:
        raise ValueError(f"unknown kind {kind!r}")
    img, items = scene(rng, grid, max_shapes)
    qtype = qtype or rng.choice(("colour", "shape", "count"))
    layout = tuple(items)
    if qtype == "count":
        return Sample(img, question_for("count"), COUNT_WORDS[len(items) - 1], kind, qtype, layout)
    shape, colour = rng.choice(items)[:2]
    if qtype == "colour":
        return Sample(img, question_for("colour", shape), colour, kind, qtype, layout)
    if qtype == "shape":
        return Sample(img, question_for("shape", colour), shape, kind, qtype, layout)
    raise ValueError(f"question type {qtype!r} does not apply to {kind} images")


def all_questions(sample: Sample) -> list[tuple[str, str]]:
    """Every (question, answer) the task can ask about the sample's image."""
    if sample.kind == "corners":
        return [(question_for("corner", c), s) for c, s in zip(CORNERS, sample.layout, strict=True)]
    qa = [(question_for("count"), COUNT_WORDS[len(sample.layout) - 1])]
    for shape, colour, *_ in sample.layout:
        qa += [(question_for("colour", shape), colour), (question_for("shape", colour), shape)]
    return qa


CORNER_TURNS = 2  # corner questions per training conversation: with all four, the last is the one left over
SHAPE_TURN_SHARE = 0.65  # per shape, how often its shape question is asked rather than its colour's: the
# shape lookup (find a colour, read the shape there) is the slower of the two to learn


def training_questions(sample: Sample, rng: random.Random) -> list[tuple[str, str]]:
    """Questions about the sample's image for one training conversation, none answerable from the text
    of the others: per shape either its colour or its shape question (asked both, the second answer
    would be the first question's subject), the count, and two of the four corners. In random order."""
    if sample.kind == "corners":
        picks = rng.sample(range(len(CORNERS)), CORNER_TURNS)
        qa = [(question_for("corner", CORNERS[i]), sample.layout[i]) for i in picks]
    else:
        qa = [(question_for("count"), COUNT_WORDS[len(sample.layout) - 1])]
        for shape, colour, *_ in sample.layout:
            if rng.random() < SHAPE_TURN_SHARE:
                qa.append((question_for("shape", colour), shape))
            else:
                qa.append((question_for("colour", shape), colour))
    rng.shuffle(qa)
    return qa


# The held-out set: its own seed, never used in training, the same on every machine.
HELDOUT_SEED = 20261130
HELDOUT_GROUPS = (
    ("single", "colour"),
    ("single", "shape"),
    ("single", "count"),
    ("multi", "colour"),
    ("multi", "shape"),
    ("multi", "count"),
    ("corners", "corner"),
)


def heldout(per_group: int = 30, seed: int = HELDOUT_SEED) -> list[Sample]:
    """``per_group`` samples of each (kind, question type) of :data:`HELDOUT_GROUPS`, in a fixed order."""
    rng = random.Random(seed)
    return [make_sample(rng, kind, qtype) for kind, qtype in HELDOUT_GROUPS for _ in range(per_group)]
