"""The training script keeps working (two steps of each stage, never the real run) and is seeded."""

import json
import random

import torch

from services.demo import pretrain
from services.demo.inputs import PromptCodec
from services.demo.train import TrainConfig, batch_for, train


def test_a_few_steps_write_a_loadable_native_checkpoint(tmp_path):
    from transformers import InternVLForConditionalGeneration

    from services.common.checkpoint import Checkpoint

    cfg = TrainConfig(
        steps=2, vision_steps=2, single_only_steps=1, save_every=2, eval_every=2, eval_per_group=1
    )
    out = train(tmp_path / "demo", cfg, log=lambda _: None)
    provenance = json.loads((out / "mesh_checkpoint.json").read_text())
    assert provenance["origin"] == "train-demo" and provenance["steps_done"] == 2
    log = [json.loads(line) for line in (tmp_path / "demo.train_log.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in log] == ["vision", "vision", None, None]
    assert "eval" in log[-1]
    model = InternVLForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_config.num_hidden_layers == 3
    assert Checkpoint.open(out).identity()


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    from services.common.tiny_checkpoint import train_tokenizer

    codec = PromptCodec(train_tokenizer())
    cfg = TrainConfig()
    (k1, b1), (k2, b2) = batch_for(400, cfg, codec), batch_for(400, cfg, codec)
    assert k1 == k2 and all(torch.equal(b1[k], b2[k]) for k in b1)
    _, b3 = batch_for(401, cfg, codec)
    assert not torch.equal(b1["pixel_values"][:1], b3["pixel_values"][:1])
    x1, s1, _ = pretrain.batch(random.Random("a"))
    x2, s2, _ = pretrain.batch(random.Random("a"))
    assert torch.equal(x1, x2) and torch.equal(s1, s2)


def test_dense_labels_mark_the_shapes():
    rng = random.Random(3)
    for _ in range(6):
        for _tile, shape, colour in pretrain.examples(rng):
            assert shape.shape == (1024,) and colour.shape == (1024,)
            assert ((shape > 0) == (colour > 0)).all()
            assert 0 < (shape > 0).sum() < 600
