import json
import shutil

import pytest
import torch

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition, NotFound


def test_vision_part_reads_no_language_model_tensor(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    vision = ckpt.load_component("vision")
    projector = ckpt.load_component("projector")
    assert vision and projector
    assert ckpt.keys_read, "the reader records what it reads"
    assert all(not k.startswith(("language_model", "lm_head")) for k in ckpt.keys_read)
    assert len(ckpt.keys_read) == len(vision) + len(projector)


def test_language_model_part_reads_no_vision_tensor(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    llm = ckpt.load_component("language_model", dtype=torch.float32)
    head = ckpt.load_component("lm_head")
    assert "embed_tokens.weight" in llm and "weight" in head
    assert all(k.startswith("language_model") for k in ckpt.keys_read)


def test_sharded_checkpoint_with_index(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    out = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, out)
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(out / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = Checkpoint.open(out)
    assert set(ckpt.load_component("language_model")) == set(
        Checkpoint.open(tiny_checkpoint).load_component("language_model")
    )
    # A shard that the index names but the directory lacks is a clear error.
    (out / "model-00002-of-00002.safetensors").unlink()
    # (sorted names put the whole language model in shard 1 and most of the vision tower in shard 2)
    assert Checkpoint.open(out).load_component("language_model")
    with pytest.raises(FailedPrecondition, match="missing"):
        Checkpoint.open(out).load_component("vision")


def test_missing_directory(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_non_internvl_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FailedPrecondition, match="not a transformers-native InternVL"):
        Checkpoint.open(tmp_path)


def test_original_format_points_to_the_converter(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(FailedPrecondition, match="internvl-mesh convert"):
        Checkpoint.open(tmp_path)


def test_no_weights(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(NotFound, match="no safetensors"):
        Checkpoint.open(tmp_path)


def test_identity_follows_content_not_location(tiny_checkpoint, tmp_path):
    import os

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert Checkpoint.open(copy).identity() == Checkpoint.open(tiny_checkpoint).identity()
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other" / "tiny", seed=1)  # same shapes, other weights
    assert Checkpoint.open(other).identity() != Checkpoint.open(tiny_checkpoint).identity()
