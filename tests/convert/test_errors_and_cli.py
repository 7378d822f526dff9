"""Unsupported layouts fail with a clear error and leave nothing behind; the CLI entry point works."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from services.common.errors import FailedPrecondition, InvalidArgument
from services.convert.cli import convert_command
from services.convert.converter import convert_checkpoint
from tests.convert.builders import build_original_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_original_checkpoint(tmp_path_factory.mktemp("good") / "original").path


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "original"
    shutil.copytree(good, dst)
    return dst


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _fails(src, dst, match, error=FailedPrecondition):
    with pytest.raises(error, match=match):
        convert_checkpoint(src, dst, progress=False)
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial"))


def test_unknown_llm_architecture(copy, tmp_path):
    _edit_config(copy, lambda c: c["llm_config"].update(architectures=["MixtralForCausalLM"]))
    _fails(copy, tmp_path / "out", "unsupported LLM architecture 'MixtralForCausalLM'.*InternLM2ForCausalLM")


@pytest.mark.parametrize("key", ["llm_config", "vision_config", "template"])
def test_missing_config_keys(copy, tmp_path, key):
    _edit_config(copy, lambda c: c.pop(key))
    _fails(copy, tmp_path / "out", f"not an original InternVL chat config: missing {key}")


def test_unknown_template_and_bad_ps_version(copy, tmp_path):
    _edit_config(copy, lambda c: c.update(template="vicuna_v1.1"))
    _fails(copy, tmp_path / "out", "unknown InternVL conversation template 'vicuna_v1.1'")
    _edit_config(copy, lambda c: c.update(template="internlm2-chat", ps_version="v3"))
    _fails(copy, tmp_path / "out", "ps_version must be one of")


def test_native_checkpoint_and_missing_weights(copy, tmp_path):
    (copy / "model.safetensors").unlink()
    _fails(copy, tmp_path / "out", "has no weights")
    _edit_config(copy, lambda c: c.update(text_config=c.pop("llm_config")))
    _fails(copy, tmp_path / "out", "already in transformers' native InternVL layout")


def test_unexpected_and_missing_tensors(copy, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["vision_model.encoder.layers.0.attn.rel_pos_bias"] = weights["mlp1.0.bias"].clone()
    save_file(weights, copy / "model.safetensors")
    _fails(copy, tmp_path / "out", "unexpected tensor 'vision_model.encoder.layers.0.attn.rel_pos_bias'")
    del weights["vision_model.encoder.layers.0.attn.rel_pos_bias"], weights["language_model.output.weight"]
    save_file(weights, copy / "model.safetensors")
    _fails(copy, tmp_path / "out", "lacks 1 tensors.*language_model.lm_head.weight")


def test_destination_exists_and_dtype(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FailedPrecondition, match="exists; pass overwrite"):
        convert_checkpoint(good, out, progress=False)
    with pytest.raises(InvalidArgument, match="dtype must be one of"):
        convert_checkpoint(good, out, dtype="int8", overwrite=True, progress=False)
    report = convert_checkpoint(good, out, dtype="bf16", overwrite=True, progress=False)
    assert report.dtype == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    shard = next(out.glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_cli_command(good, tmp_path):
    app = typer.Typer()
    app.command("convert")(convert_command)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand form
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(good), str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert "InternLM2ForCausalLM → llama" in ok.output and "ps_version v2" in ok.output
    again = runner.invoke(app, ["convert", str(good), str(tmp_path / "out")])
    assert again.exit_code == 2 and "pass overwrite" in again.output
