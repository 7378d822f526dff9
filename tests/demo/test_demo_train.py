"""The training script keeps working (two steps of each stage, never the real run) and is seeded."""

import json
import random

import torch

from services.demo import pretrain
from services.demo.inputs import PromptCodec
from services.demo.train import (
    DEMO_PATCH,
    DEMO_TOKENS_PER_TILE,
    PoolIndex,
    TrainConfig,
    batch_for,
    build_model,
    kind_weights,
    max_shapes_at,
    train,
)


def test_a_few_steps_write_a_loadable_native_checkpoint(tmp_path):
    from transformers import InternVLForConditionalGeneration

    from services.common.checkpoint import Checkpoint

    cfg = TrainConfig(
        steps=2,
        vision_steps=2,
        pool_tiles=8,
        single_only_steps=1,
        save_every=2,
        eval_every=2,
        eval_per_group=1,
    )
    out = train(tmp_path / "demo", cfg, log=lambda _: None)
    provenance = json.loads((out / "mesh_checkpoint.json").read_text())
    assert provenance["origin"] == "train-demo" and provenance["steps_done"] == 2
    log = [json.loads(line) for line in (tmp_path / "demo.train_log.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in log] == ["vision", "vision", None, None]
    assert "eval" in log[-1]
    model = InternVLForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_config.num_hidden_layers == 3
    assert model.config.image_seq_length == DEMO_TOKENS_PER_TILE
    assert Checkpoint.open(out).identity()
    initial, _ = build_model(cfg.seed)
    assert _changed(initial, model, "model.vision_tower.")  # stage 0 trains the tower
    assert _changed(initial, model, "model.multi_modal_projector.")
    assert _changed(initial, model, "model.language_model.")


def _changed(before, after, prefix: str) -> bool:
    old, new = before.state_dict(), after.state_dict()
    names = [n for n in old if n.startswith(prefix)]
    assert names, prefix
    return any(not torch.equal(old[n], new[n]) for n in names)


def test_stage_one_keeps_the_tower_frozen(tmp_path):
    from transformers import InternVLForConditionalGeneration

    cfg = TrainConfig(steps=2, vision_steps=0, pool_tiles=8, save_every=2, eval_every=2, eval_per_group=1)
    model = InternVLForConditionalGeneration.from_pretrained(train(tmp_path / "d", cfg, log=lambda _: None))
    initial, _ = build_model(cfg.seed)
    assert not _changed(initial, model, "model.vision_tower.")
    assert _changed(initial, model, "model.language_model.")


def test_batches_are_a_function_of_seed_and_step(demo_pool):
    from services.common.tiny_checkpoint import train_tokenizer

    codec = PromptCodec(train_tokenizer(), DEMO_TOKENS_PER_TILE)
    cfg = TrainConfig()
    index = PoolIndex(demo_pool)
    (k1, b1), (k2, b2) = batch_for(1400, cfg, codec, index), batch_for(1400, cfg, codec, index)
    assert k1 == k2 and all(torch.equal(b1[k], b2[k]) for k in b1)
    _, b3 = batch_for(1401, cfg, codec, index)
    assert not torch.equal(b1["input_ids"], b3["input_ids"])
    # one grounding label triple per image token, in the order the image tokens are filled
    image_tokens = int((b1["input_ids"] == codec.context_id).sum())
    assert b1["grounding"].shape == (3, image_tokens) == (3, len(b1["pixel_values"]) * DEMO_TOKENS_PER_TILE)
    # each pointer goes from a position that predicts an answer token (not the closing <|im_end|>) to
    # image tokens of its own row; every answer token's position is a readout position
    rows, queries, targets = b1["pointer_rows"], b1["pointer_queries"], b1["pointer_targets"]
    assert len(rows) > 0 and targets.shape == (len(rows), b1["input_ids"].shape[1])
    for r, q, t in zip(rows, queries, targets, strict=True):
        assert b1["labels"][r, q + 1] not in (-100, codec.eos_id)
        assert t.any() and (b1["input_ids"][r][t] == codec.context_id).all()
    predicted = b1["labels"][b1["answer_rows"], b1["answer_queries"] + 1]
    answer_tokens = (b1["labels"] != -100) & (b1["labels"] != codec.eos_id)
    assert len(predicted) == int(answer_tokens.sum()) and not (predicted == codec.eos_id).any()
    x1, s1, _ = pretrain.batch(random.Random("a"), DEMO_PATCH)
    x2, s2, _ = pretrain.batch(random.Random("a"), DEMO_PATCH)
    assert torch.equal(x1, x2) and torch.equal(s1, s2)


def test_the_curriculum_draws_few_shapes_first(demo_pool):
    cfg = TrainConfig()
    index = PoolIndex(demo_pool)
    assert kind_weights(0, cfg) == {"single": 1.0} and max_shapes_at(0, cfg) == 1
    assert max_shapes_at(cfg.one_shape_steps, cfg) == 2 and max_shapes_at(cfg.two_shape_steps, cfg) == 4
    for limit in (1, 2):
        chosen = [demo_pool[i] for i in index.choices("single", limit)]
        assert chosen and all(len(image.sample.layout) <= limit for image in chosen)
    assert any(len(demo_pool[i].sample.layout) > 2 for i in index.choices("single", 4))


def test_dense_labels_mark_the_shapes():
    rng = random.Random(3)
    for _ in range(6):
        for _tile, shape, colour in pretrain.examples(rng, DEMO_PATCH):
            assert shape.shape == ((448 // DEMO_PATCH) ** 2,) == colour.shape
            assert ((shape > 0) == (colour > 0)).all()
            assert 0 < (shape > 0).sum() < 0.6 * shape.size


def test_swapped_grid_tiles_keep_the_scene_thumbnail(demo_pool):
    """With ``grid_swap`` 1 every multi-tile scene of a batch keeps its own thumbnail (what its answers
    and labels describe) and gets the grid tiles of another scene with the same tiling."""
    from services.common.tiny_checkpoint import train_tokenizer

    codec = PromptCodec(train_tokenizer(), DEMO_TOKENS_PER_TILE)
    index = PoolIndex(demo_pool)
    thumbnails = {image.features[-1].tobytes(): image for image in demo_pool if image.sample.kind == "multi"}
    seen = 0
    for step in range(1400, 1600):
        kind, batch = batch_for(step, TrainConfig(grid_swap=1.0), codec, index)
        if kind != "multi":
            continue
        tiles = (batch["input_ids"] == codec.context_id).sum(1) // DEMO_TOKENS_PER_TILE
        start = 0
        for n in tiles.tolist():
            features = batch["pixel_values"][start : start + n].numpy()
            start += n
            own = thumbnails[features[-1].tobytes()]
            assert len(own.features) == n
            assert not (features[:-1] == own.features[:-1]).all()
            seen += 1
        if seen >= 4:
            break
    assert seen >= 4
