"""The decoder's support check refuses what the engine refuses at load, with the same message, and
passes what it loads; it reads no weight."""

from __future__ import annotations

import json
import shutil

import pytest

from services.common.checkpoint import Checkpoint
from services.common.errors import MeshError
from services.decoder.config import CacheConfig, DecoderConfig, ParallelConfig, SchedulerConfig
from services.decoder.engine.llm_engine import LLMEngine
from services.decoder.support import check_checkpoint

SMALL_CACHE = CacheConfig(num_blocks=64)


def _edited(tiny_ckpt, tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    config = json.loads((out / "config.json").read_text())
    edit(config["text_config"])
    (out / "config.json").write_text(json.dumps(config))
    return out


REFUSED = {
    "family": (lambda t: t.update(model_type="mamba"), {}, "language model type 'mamba' is not supported"),
    "rope": (
        lambda t: t.update(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}),
        {},
        "rope type 'proportional'",
    ),
    "config": (lambda t: t.pop("num_attention_heads"), {}, "text_config of this checkpoint lacks"),
    "activation": (lambda t: t.update(hidden_act="gelu"), {}, "hidden_act 'gelu' is not supported"),
    "length": (
        lambda t: None,
        {"scheduler": SchedulerConfig(max_model_len=10**6)},
        r"max_model_len=1000000 exceeds \d+: the model's",
    ),
    "window": (lambda t: t.update(use_sliding_window=True, sliding_window=64), {}, "64-token sliding window"),
    "backend": (lambda t: None, {"attention_backend": "flash_attn"}, "'flash_attn' is not available on cpu"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_for_the_reason_loading_gives(tiny_ckpt, tmp_path, case):
    edit, settings, reason = REFUSED[case]
    path = _edited(tiny_ckpt, tmp_path, edit)
    config = DecoderConfig(model=str(path), cache=SMALL_CACHE, **settings)
    ckpt = Checkpoint.open(path)
    with pytest.raises(MeshError, match=reason) as checked:
        check_checkpoint(ckpt, config)
    with pytest.raises(MeshError) as loaded:
        LLMEngine(config)
    assert loaded.value.message == checked.value.message
    assert not ckpt.keys_read


def test_tensor_parallel_split_is_checked(tiny_ckpt):
    config = DecoderConfig(model=str(tiny_ckpt), parallel=ParallelConfig(tensor_parallel_size=3))
    with pytest.raises(MeshError, match="do not split over tensor_parallel_size=3"):
        check_checkpoint(Checkpoint.open(tiny_ckpt), config)


def test_missing_weights_are_refused(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    ckpt = Checkpoint.open(path)
    ckpt.weight_map = {k: v for k, v in ckpt.weight_map.items() if not k.startswith("language_model.")}
    with pytest.raises(MeshError, match="has no language_model weights"):
        check_checkpoint(ckpt, DecoderConfig(model=str(path)))


def test_a_servable_checkpoint_passes(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    check_checkpoint(ckpt, DecoderConfig(model=str(tiny_ckpt)))
    assert not ckpt.keys_read
