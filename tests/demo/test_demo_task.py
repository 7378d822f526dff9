"""The synthetic task: seeded, closed-vocabulary, tiled as designed by the reference tiling, and the
corner shapes invisible in the thumbnail (so only the tiles, in order, can answer)."""

import random

import numpy as np
import pytest

from services.demo.reference import dynamic_preprocess, reference_grid
from services.demo.task import (
    ANSWERS,
    CORNER_SIZE,
    CORNER_TURNS,
    HELDOUT_GROUPS,
    KINDS,
    heldout,
    make_sample,
    training_questions,
)


def test_same_seed_same_samples():
    a, b = heldout(3), heldout(3)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(x.png() == y.png() for x, y in zip(a, b, strict=True))
    assert [s.png() for s in heldout(3, seed=1)] != [s.png() for s in a]


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_tile_as_designed(kind):
    rng = random.Random(kind)
    for _ in range(40):
        s = make_sample(rng, kind)
        assert s.answer in ANSWERS
        grid = reference_grid(*s.image.size)
        if kind == "single":
            assert grid == (1, 1)
        elif kind == "multi":
            assert grid in ((2, 2), (2, 1), (1, 2))
        else:
            assert s.image.size == (CORNER_SIZE, CORNER_SIZE) and grid == (2, 2)


def test_corner_shapes_exist_only_in_the_tiles():
    rng = random.Random(5)
    for _ in range(5):
        s = make_sample(rng, "corners")
        tiles = [np.asarray(t).astype(np.int16) for t in dynamic_preprocess(s.image, use_thumbnail=True)]
        assert len(tiles) == 5
        assert all(t.std() > 40 for t in tiles[:4]), "every quadrant holds a checkerboard shape"
        assert np.abs(tiles[4] - 128).max() <= 3, "the thumbnail is flat grey"


def test_multi_tile_shapes_are_cut_by_tile_boundaries():
    """Every shape of a multi-tile scene crosses a tile boundary: no tile holds a whole shape."""
    rng = random.Random(9)
    for _ in range(40):
        s = make_sample(rng, "multi")
        w, h = s.image.size
        cols, rows = reference_grid(w, h)
        cuts_x = [w * c / cols for c in range(1, cols)]
        cuts_y = [h * r / rows for r in range(1, rows)]
        assert s.layout
        for _shape, _colour, cx, cy, r in s.layout:
            nearest = min([abs(cx - x) for x in cuts_x] + [abs(cy - y) for y in cuts_y])
            assert nearest < r / 2, (s.image.size, cx, cy, r)


def test_heldout_groups_are_balanced():
    samples = heldout(4)
    assert [(s.kind, s.qtype) for s in samples[::4]] == list(HELDOUT_GROUPS)


@pytest.mark.parametrize("cap", [1, 2])
def test_training_curriculum_caps_the_shapes(cap):
    rng = random.Random(cap)
    counts = {len(make_sample(rng, kind, max_shapes=cap).layout) for kind in ("single", "multi") * 20}
    assert counts == set(range(1, cap + 1))


def test_no_training_answer_can_be_read_off_another_turn():
    """Asked both "what colour is the circle?" and "what shape is the red one?", a model could copy the
    second answer from the first question's text; training conversations never pair them."""
    rng = random.Random(4)
    for kind in KINDS:
        for _ in range(30):
            sample = make_sample(rng, kind)
            turns = training_questions(sample, rng)
            assert len({q for q, _ in turns}) == len(turns)
            for i, (question, answer) in enumerate(turns):
                if question.startswith("How many"):
                    continue  # "one" is also a word of "the red one?"
                others = " ".join(f"{q} {a}" for j, (q, a) in enumerate(turns) if j != i)
                assert answer not in others.replace("?", "").split(" "), (answer, others)
            if kind == "corners":
                assert len(turns) == CORNER_TURNS
            else:
                assert len(turns) == 1 + len(sample.layout)
