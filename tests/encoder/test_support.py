"""The encoder's support check refuses what ``VisionEncoder.load`` refuses, with the same message,
and passes what it loads; it reads no weight."""

from __future__ import annotations

import json
import shutil

import pytest

from services.common.checkpoint import Checkpoint
from services.common.errors import MeshError
from services.encoder.config import EncoderConfig
from services.encoder.support import check_checkpoint
from services.encoder.vision_model import VisionEncoder


def _edited(tiny_checkpoint, tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


REFUSED = {
    "activation": (
        lambda c: c["vision_config"].update(hidden_act="relu"),
        {},
        "unsupported activation 'relu'",
    ),
    "norm": (lambda c: c["vision_config"].update(norm_type="batch_norm"), {}, "unsupported vision norm_type"),
    "select": (
        lambda c: c.update(vision_feature_select_strategy="full"),
        {},
        "only vision_feature_select_strategy 'default'",
    ),
    "ps_version": (lambda c: c.update(ps_version="v3"), {}, "ps_version must be one of"),
    "config": (
        lambda c: c["text_config"].pop("hidden_size"),
        {},
        "config of this checkpoint lacks 'hidden_size'",
    ),
    "attention": (lambda c: None, {"attention": "flash_attn"}, "'flash_attn' cannot run on cpu"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_for_the_reason_loading_gives(tiny_checkpoint, tmp_path, case):
    edit, settings, reason = REFUSED[case]
    path = _edited(tiny_checkpoint, tmp_path, edit)
    config = EncoderConfig(checkpoint=str(path), **settings)
    ckpt = Checkpoint.open(path)
    with pytest.raises(MeshError, match=reason) as checked:
        check_checkpoint(ckpt, config)
    assert not ckpt.keys_read
    with pytest.raises(MeshError) as loaded:
        VisionEncoder.load(ckpt, config.device, config.dtype, config.attention)
    assert loaded.value.message == checked.value.message


def test_missing_projector_weights_are_refused(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    ckpt.weight_map = {k: v for k, v in ckpt.weight_map.items() if "multi_modal_projector" not in k}
    with pytest.raises(MeshError, match="has no projector weights"):
        check_checkpoint(ckpt, EncoderConfig(checkpoint=str(tiny_checkpoint)))


def test_a_servable_checkpoint_passes(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    check_checkpoint(ckpt, EncoderConfig(checkpoint=str(tiny_checkpoint)))
    assert not ckpt.keys_read
