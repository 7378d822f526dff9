"""Stage 1's grounding labels say what each image token shows, in the order transformers fills the image
tokens; the stored tower output gives the model what the pixels would."""

import random

import numpy as np
import pytest
import torch

from services.demo import task
from services.demo.grounding import (
    CHECKER,
    UNLABELLED,
    WHOLE,
    pointer_targets,
    tile_label_maps,
    token_labels,
)
from services.demo.inputs import collate, encode_sample, reference_pixels
from services.demo.pool import stored_features
from services.demo.reference import dynamic_preprocess
from services.demo.train import DEMO_TOKENS_PER_TILE

SIDE = 8  # tokens per tile side
BLOCK = 448 // SIDE


def _samples(kind: str, n: int, seed: int = 7) -> list[task.Sample]:
    rng = random.Random(seed)
    return [task.make_sample(rng, kind) for _ in range(n)]


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_labelled_blocks_show_that_colour_and_the_others_do_not(kind):
    for sample in _samples(kind, 6):
        shape, colour, _ = token_labels(sample, SIDE)
        tiles = np.stack([np.asarray(t) for t in dynamic_preprocess(sample.image, 1, 12, 448, True)])
        blocks = tiles.reshape(len(tiles), SIDE, BLOCK, SIDE, BLOCK, 3).transpose(0, 1, 3, 2, 4, 5)
        blocks = blocks.reshape(len(tiles), SIDE * SIDE, BLOCK * BLOCK, 3).astype(int)
        names = list(task.COLOURS)
        for t in range(len(tiles)):
            for k in range(SIDE * SIDE):
                near = {
                    c: float((np.abs(blocks[t, k] - rgb).sum(-1) < 40).mean())
                    for c, rgb in task.COLOURS.items()
                }
                if shape[t, k] == UNLABELLED:
                    assert kind == "multi" and t < len(tiles) - 1  # a scene's grid tiles: pieces
                elif shape[t, k]:
                    assert near[names[colour[t, k] - 1]] >= 0.15, (t, k, near)
                else:
                    assert max(near.values()) < 0.3, (t, k, near)


def test_scene_grid_tiles_are_left_to_the_thumbnail():
    for sample in _samples("multi", 4):
        shape, colour, slot = token_labels(sample, SIDE)
        assert (shape[:-1] == UNLABELLED).all() and (colour[:-1] == UNLABELLED).all()
        assert (shape[-1] >= 0).all() and shape[-1].any()
        assert slot[:, 0].tolist() == [*range(len(shape) - 1), WHOLE]


def test_corner_tiles_carry_their_shape_and_the_thumbnail_nothing():
    for sample in _samples("corners", 3):
        shape, colour, slot = token_labels(sample, SIDE)
        assert slot[:, 0].tolist() == [0, 1, 2, 3, WHOLE] and (slot == slot[:, :1]).all()
        for t, name in enumerate(sample.layout):
            assert set(shape[t].tolist()) == {0, 1 + task.SHAPES.index(name)}
            assert set(colour[t].tolist()) == {0, CHECKER}
        assert not shape[-1].any() and not colour[-1].any()


def test_token_order_is_the_order_of_transformers_pixel_shuffle(demo_untrained):
    """Per-patch labels pushed through the model's own pixel shuffle land on the tokens that the grounding
    labels name: a transposed or shifted order would not."""
    model, _ = demo_untrained
    checked = 0
    for sample in _samples("single", 6, seed=11) + _samples("multi", 2, seed=11):
        maps, _ = tile_label_maps(sample)
        shape, _, _ = token_labels(sample, SIDE)
        centres = np.arange(7, 448, 14)
        patches = torch.from_numpy(maps[:, centres][:, :, centres].astype(np.float32))[..., None]
        shuffled = model.model.pixel_shuffle(patches, scale_factor=0.25).reshape(len(maps), -1, 16)
        counts = torch.nn.functional.one_hot(shuffled.long(), 5)[..., 1:].sum(-2)  # (T, 64, shapes)
        most = (counts.argmax(-1) + 1).numpy()
        on = shape > 0
        assert (most[on] == shape[on]).mean() > 0.95
        assert (counts.sum(-1).numpy()[shape == 0] <= 8).all()  # unlabelled blocks are mostly background
        checked += int(on.sum())
    assert checked > 50


def test_stored_tower_output_gives_the_logits_of_the_pixels(demo_untrained):
    model, codec = demo_untrained
    batch = collate(codec, [encode_sample(codec, s) for s in _samples("multi", 2)])
    with torch.no_grad():
        from_pixels = model(**batch).logits
        stored = dict(batch)
        stored["pixel_values"] = model.model.vision_tower(
            pixel_values=batch["pixel_values"]
        ).last_hidden_state
        with stored_features(model):
            from_stored = model(**stored).logits
    assert from_pixels.shape == from_stored.shape
    torch.testing.assert_close(from_stored, from_pixels, rtol=1e-4, atol=1e-4)
    assert model.model.vision_tower.__class__.__name__ == "InternVLVisionModel"  # restored


def test_the_pool_keeps_one_label_per_image_token(demo_pool):
    assert sum(len(image.features) for image in demo_pool) >= 60
    assert {image.sample.kind for image in demo_pool} == {"single", "multi", "corners"}
    for image in demo_pool:
        t = len(image.features)
        assert image.features.dtype == np.float16 and image.features.shape[1] == 1 + 32 * 32
        assert image.grounding.shape == (3, t, DEMO_TOKENS_PER_TILE)
        assert image.sample.image is None and image.sample.layout
    single = next(image for image in demo_pool if image.sample.kind == "single")
    assert len(reference_pixels(task.make_sample(random.Random(0), "single").image)) == 1
    assert len(single.features) == 1


def test_questions_parse_back_to_type_and_subject():
    for qtype, subjects in (
        ("colour", task.SHAPES),
        ("shape", list(task.COLOURS)),
        ("corner", task.CORNERS),
        ("count", [""]),
    ):
        for subject in subjects:
            assert task.parse_question(task.question_for(qtype, subject)) == (qtype, subject)
    with pytest.raises(ValueError):
        task.parse_question("What is the meaning of this?")


def test_pointers_aim_at_the_tokens_that_hold_the_answer():
    for kind in ("single", "corners"):
        for sample in _samples(kind, 4, seed=3):
            labels = np.stack(token_labels(sample, SIDE)).reshape(3, -1)
            for question, answer in task.all_questions(sample):
                hit = pointer_targets(question, labels)
                qtype, subject = task.parse_question(question)
                if qtype == "count":
                    assert hit is None
                    continue
                assert hit is not None and hit.any()
                if qtype == "colour":
                    assert set(labels[1][hit].tolist()) == {1 + list(task.COLOURS).index(answer)}
                elif qtype == "shape":
                    assert set(labels[0][hit].tolist()) == {1 + task.SHAPES.index(answer)}
                else:
                    assert set(labels[0][hit].tolist()) == {1 + task.SHAPES.index(answer)}
                    assert set(labels[2][hit].tolist()) == {task.CORNERS.index(subject)}
