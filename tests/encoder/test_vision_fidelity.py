"""Our vision encoder against transformers' InternVL classes (and OpenGVLab's v1 pixel shuffle), fp32 CPU.

Contract: ``VisionEncoder.encode(uint8 tiles)`` equals
``InternVLModel.get_image_features(normalize(tiles)).pooler_output`` within 1e-5.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLModel

from mesh.verify.reference import opengvlab_pixel_shuffle
from services.common.checkpoint import Checkpoint
from services.encoder.attention import resolve_backend
from services.encoder.pixel_shuffle import pixel_shuffle
from services.encoder.vision_model import VisionEncoder
from services.preprocess.normalize import normalize_tiles

TOL = 1e-5


def random_tiles(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return InternVLModel.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return VisionEncoder.load(Checkpoint.open(tiny_checkpoint))


def reference_features(model: InternVLModel, tiles: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(normalize_tiles(tiles), **kwargs).pooler_output


@pytest.mark.parametrize("n_tiles", [1, 2, 13])
def test_matches_transformers(encoder, reference, n_tiles):
    tiles = random_tiles(n_tiles, seed=n_tiles)
    ours = encoder.encode(tiles)
    theirs = reference_features(reference, tiles)
    assert ours.shape == (n_tiles, 256, reference.config.text_config.hidden_size)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= TOL


def test_loading_reads_no_language_model_tensor(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    VisionEncoder.load(ckpt)
    assert ckpt.keys_read, "the loader read nothing"
    lm_keys = set(ckpt.component_keys("language_model").values()) | set(
        ckpt.component_keys("lm_head").values()
    )
    assert lm_keys, "the tiny checkpoint should have language-model tensors to avoid"
    assert not ckpt.keys_read & lm_keys
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in ckpt.keys_read)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * 0.06)
            elif name.endswith("bias"):
                p.copy_(noise * 0.06)
            else:  # norm weights, layer scales: around their usual values, but not exactly
                p.add_(noise * 0.1)


def test_internvit_6b_settings_match_transformers(tiny_checkpoint, tmp_path):
    """RMSNorm blocks, qk-norm over the full width, no qkv bias: transformers built with those values."""
    config = InternVLConfig.from_pretrained(tiny_checkpoint)
    config.vision_config.norm_type = "rms_norm"
    config.vision_config.use_qk_norm = True
    config.vision_config.attention_bias = False
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    _randomise(model, seed=3)
    model.save_pretrained(tmp_path / "six_b_style")

    ckpt = Checkpoint.open(tmp_path / "six_b_style")
    assert ckpt.vision_config["norm_type"] == "rms_norm" and ckpt.vision_config["use_qk_norm"]
    ours_enc = VisionEncoder.load(ckpt)
    assert not any(
        "bias" in n for n, _ in ours_enc.module.vision.encoder.layer[0].attention.qkv.named_parameters()
    )
    reference = InternVLModel.from_pretrained(tmp_path / "six_b_style").eval()
    tiles = random_tiles(2, seed=5)
    assert (ours_enc.encode(tiles) - reference_features(reference, tiles)).abs().max().item() <= TOL


@pytest.mark.parametrize(("patch", "ratio", "tokens"), [(14, 0.25, 64), (28, 0.5, 64), (16, 0.5, 196)])
def test_other_patch_grids_match_transformers(tmp_path, patch, ratio, tokens):
    """Patch size and downsample ratio come from the config (the demo model: 14 and 0.25, 64 tokens)."""
    from services.common.tiny_checkpoint import PRESETS, build_config, train_tokenizer

    config = build_config(
        PRESETS["tiny"], "qwen2", train_tokenizer(), patch_size=patch, downsample_ratio=ratio
    )
    assert config.image_seq_length == tokens
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    _randomise(model, seed=4)
    model.save_pretrained(tmp_path / "grid")
    ours = VisionEncoder.load(Checkpoint.open(tmp_path / "grid"))
    assert ours.tokens_per_tile == tokens
    reference = InternVLModel.from_pretrained(tmp_path / "grid").eval()
    tiles = random_tiles(2, seed=6)
    got = ours.encode(tiles)
    assert got.shape == (2, tokens, config.text_config.hidden_size)
    assert (got - reference_features(reference, tiles)).abs().max().item() <= TOL


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_reference(version):
    x = torch.randn(3, 32, 32, 8)
    ref = opengvlab_pixel_shuffle(x, 0.5, version).reshape(3, -1, 32)
    assert torch.equal(pixel_shuffle(x, 0.5, version), ref)


def test_pixel_shuffle_v2_is_transformers(reference):
    x = torch.randn(2, 32, 32, 8)
    theirs = reference.pixel_shuffle(x, scale_factor=0.5).reshape(2, -1, 32)
    assert torch.equal(pixel_shuffle(x, 0.5, "v2"), theirs)


def _derived_checkpoint(src, dst, **top_level):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(top_level)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_ps_version_v1_checkpoint(tiny_checkpoint, reference, tmp_path):
    """A checkpoint saying ps_version v1: transformers' tower and projector around OpenGVLab's v1 shuffle."""
    ckpt = Checkpoint.open(_derived_checkpoint(tiny_checkpoint, tmp_path / "v1", ps_version="v1"))
    assert ckpt.ps_version == "v1"
    ours = VisionEncoder.load(ckpt).encode(random_tiles(2, seed=7))
    tiles = random_tiles(2, seed=7)
    with torch.no_grad():
        feats = reference.vision_tower(pixel_values=normalize_tiles(tiles)).last_hidden_state[:, 1:, :]
        feats = feats.reshape(2, 32, 32, -1)
        shuffled = opengvlab_pixel_shuffle(feats, 0.5, "v1").reshape(2, 256, -1)
        expected = reference.multi_modal_projector(shuffled)
    assert (ours - expected).abs().max().item() <= TOL
    v2 = reference_features(reference, tiles)
    assert (ours - v2).abs().max().item() > 1e-3, "v1 and v2 orders should give different embeddings"


def test_other_feature_layer(tiny_checkpoint, reference, tmp_path):
    ckpt = Checkpoint.open(_derived_checkpoint(tiny_checkpoint, tmp_path / "l2", vision_feature_layer=-2))
    tiles = random_tiles(1, seed=9)
    ours = VisionEncoder.load(ckpt).encode(tiles)
    theirs = reference_features(reference, tiles, vision_feature_layer=-2)
    assert (ours - theirs).abs().max().item() <= TOL


def test_wrong_tiles_are_invalid(encoder):
    from services.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        encoder.encode(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    with pytest.raises(InvalidArgument):
        encoder.encode(torch.zeros(1, 448, 448, 3, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flash_attn_matches_sdpa_on_gpu(tiny_checkpoint):
    pytest.importorskip("flash_attn")
    ckpt = Checkpoint.open(tiny_checkpoint)
    flash = VisionEncoder.load(ckpt, device="cuda", dtype="bfloat16", attention="flash_attn")
    sdpa = VisionEncoder.load(ckpt, device="cuda", dtype="bfloat16", attention="sdpa")
    assert resolve_backend("auto", "cuda", torch.bfloat16).name == "flash_attn"
    tiles = random_tiles(4, seed=11)
    a, b = flash.encode(tiles).float(), sdpa.encode(tiles).float()
    rel = (a - b).norm() / b.norm()
    assert rel.item() < 2e-2


def test_auto_backend_on_cpu_is_sdpa():
    assert resolve_backend("auto", "cpu", torch.float32).name == "sdpa"
