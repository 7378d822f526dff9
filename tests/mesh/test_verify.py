"""``internvl-mesh verify`` through the real command line: it passes on a checkpoint the mesh serves
faithfully, fails when the reference sees other weights than the services, and refuses a directory
that is not a checkpoint with one line, not a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Three images (1x1, 2x1 and 1x2 grids at max_num 4: 7 tiles) and 8 tokens keep a run to seconds.
QUICK = ["--images", "3", "--max-new-tokens", "8", "--max-num", "4", "--device", "cpu"]


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "verify", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def verdicts(stdout: str) -> dict[str, str]:
    """check name -> PASS or FAIL, from the lines ``PASS  tiles  ...``."""
    out = {}
    for line in stdout.splitlines():
        word, _, rest = line.partition("  ")
        if word in ("PASS", "FAIL") and rest.strip():
            out[rest.split()[0]] = word
    return out


def test_tiny_checkpoint_passes_every_check(tiny_checkpoint, tmp_path):
    report_path = tmp_path / "verify.json"
    run = verify("--model", str(tiny_checkpoint), *QUICK, "--json", str(report_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"tiles": "PASS", "embeddings": "PASS", "tokens": "PASS"}
    assert "(tolerance: bit-exact)" in run.stdout
    assert "(tolerance: max abs diff <= 1e-05)" in run.stdout
    assert "(tolerance: greedy tokens identical to generate)" in run.stdout
    assert "PASS: 3 of 3 checks passed" in run.stdout

    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert (report["device"], report["dtype"], report["max_num"]) == ("cpu", "float32", 4)
    assert [i["grid"] for i in report["images"]] == [[1, 1], [2, 1], [1, 2]]
    assert [i["tiles"] for i in report["images"]] == [1, 3, 3]
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["passed"] for c in checks.values())
    assert checks["tiles"]["measured"]["differing"] == 0 and checks["tiles"]["measured"]["tiles"] == 7
    assert checks["embeddings"]["measured"]["max_abs_diff"] <= 1e-5
    assert checks["embeddings"]["measured"]["tiles"] == 7
    tokens = checks["tokens"]["measured"]
    assert tokens["identical"] == tokens["requests"] == 3
    assert tokens["positions"] > 0 and tokens["agreement"] == 1.0


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """``src`` with two tensors changed: the projector's output bias + 1e-3 (every embedding value moves
    by 1e-3, a hundred times the float32 tolerance) and the LM head negated (the greedy choice becomes
    the served model's least likely token)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["multi_modal_projector.linear_2.bias"] += 1e-3
    tensors["language_model.lm_head.weight"] = -tensors["language_model.lm_head.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_fails_when_the_reference_sees_other_weights(tiny_checkpoint, tmp_path):
    """The check can fail: ``--reference`` points transformers at a copy of the checkpoint whose weights
    differ in two tensors (``_perturbed_copy``) while the services load the original. Tiling does not
    depend on weights and still passes; the embeddings are off by the bias shift, exactly, and the
    greedy tokens differ; the exit code says so."""
    reference = _perturbed_copy(tiny_checkpoint, tmp_path / "perturbed")
    report_path = tmp_path / "verify.json"
    run = verify(
        "--model", str(tiny_checkpoint), "--reference", str(reference), *QUICK, "--json", str(report_path)
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"tiles": "PASS", "embeddings": "FAIL", "tokens": "FAIL"}
    assert "FAIL: 1 of 3 checks passed" in run.stdout
    assert "first difference at new token" in run.stdout

    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["embeddings"]["measured"]["max_abs_diff"] == pytest.approx(1e-3, rel=0.01)
    assert checks["tokens"]["measured"]["identical"] < 3


@pytest.mark.parametrize("config", [None, {"model_type": "llama"}], ids=["no-config", "not-internvl"])
def test_refuses_what_is_not_a_checkpoint(tmp_path, config):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    run = verify("--model", str(tmp_path), "--device", "cpu")
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert ("has no config.json" if config is None else "not a transformers-native InternVL") in run.stderr


def test_reference_honours_ps_version_v1(tiny_checkpoint, tmp_path):
    """A converted InternVL 1.5 checkpoint says ``ps_version`` v1, which transformers does not implement:
    the reference swaps in OpenGVLab's v1 shuffle, so it agrees with our encoder on that checkpoint, and
    transformers' own v2 (the same weights without the key) does not."""
    import torch

    from mesh.verify.images import builtin_images
    from mesh.verify.reference import ReferenceModel, reference_pixels
    from services.common.checkpoint import Checkpoint
    from services.common.types import TilingParams
    from services.encoder.vision_model import VisionEncoder
    from services.preprocess.pipeline import Preprocessor

    v1 = tmp_path / "v1"
    shutil.copytree(tiny_checkpoint, v1)
    config = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**config, "ps_version": "v1"}))
    png = builtin_images(2)[1].png  # 2x1 grid + thumbnail at max_num 2
    with Preprocessor() as pre:
        (tiled,) = pre.tile_images([(png, TilingParams(max_num=2))])
    ours = VisionEncoder.load(Checkpoint.open(v1)).encode(torch.from_numpy(tiled.tiles))
    pixels = reference_pixels(png, max_num=2, tile_size=448)
    for path, agrees in ((v1, True), (tiny_checkpoint, False)):
        reference = ReferenceModel(path, "float32", "cpu")
        theirs = reference.embeddings(pixels)
        reference.close()
        assert ((ours - theirs).abs().max().item() <= 1e-5) is agrees


@pytest.mark.slow
def test_a_family_fixture_passes_every_check(family_checkpoint, tmp_path):
    """InternVL2-8B's real configuration (InternLM2.5 with dynamic NTK rope, its 92,553-token vocabulary and
    special-token ids), converted from the original layout as an operator would, then verified."""
    from services.convert.converter import convert_checkpoint

    native = convert_checkpoint(family_checkpoint("InternVL2-8B"), tmp_path / "native", progress=False).dst
    run = verify("--model", str(native), *QUICK)
    assert run.returncode == 0, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"tiles": "PASS", "embeddings": "PASS", "tokens": "PASS"}
