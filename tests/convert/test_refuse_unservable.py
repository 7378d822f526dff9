"""``convert`` does not write a checkpoint that the mesh's decoder or encoder would refuse: it fails with
the services' own reasons and leaves nothing behind; with ``force`` (``--force``) it writes it and warns."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from services.common.checkpoint import Checkpoint
from services.common.errors import FailedPrecondition
from services.convert.cli import convert_command
from services.convert.converter import convert_checkpoint, serve_refusals
from tests.convert.builders import build_original_checkpoint

# (edit of the original config.json, the reason the mesh gives for the converted checkpoint)
UNSERVABLE = {
    # The decoder's paged attention has no sliding window; the LLM's 32 tokens are < its 256 positions.
    "decoder": (
        lambda c: c["llm_config"].update(sliding_window=32),
        "decoder: the model uses a 32-token sliding window, which the paged backends do not implement: "
        "set scheduler.max_model_len <= 32",
    ),
    # The vision encoder implements the GELU activations only.
    "encoder": (
        lambda c: c["vision_config"].update(hidden_act="relu"),
        "encoder: unsupported activation 'relu'; one of ['gelu', 'gelu_pytorch_tanh']",
    ),
}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return build_original_checkpoint(
        tmp_path_factory.mktemp("phi3") / "original", llm="phi3", template="phi3-chat"
    ).path


@pytest.fixture(params=sorted(UNSERVABLE))
def unservable(request, phi3, tmp_path):
    edit, reason = UNSERVABLE[request.param]
    src = tmp_path / "original"
    shutil.copytree(phi3, src)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    return src, reason


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("convert")(convert_command)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand form
    return app


def test_the_unedited_checkpoint_converts_and_is_servable(phi3, tmp_path):
    report = convert_checkpoint(phi3, tmp_path / "out", progress=False)
    assert report.refusals == ()
    assert serve_refusals(tmp_path / "out") == []


def test_convert_refuses_to_write_it(unservable, tmp_path):
    src, reason = unservable
    dst = tmp_path / "out"
    with pytest.raises(FailedPrecondition) as caught:
        convert_checkpoint(src, dst, progress=False)
    assert caught.value.message.startswith(f"not writing {dst}: the mesh could not serve it:\n  {reason}\n")
    assert caught.value.reason == "checkpoint_unservable"
    assert not dst.exists()
    assert not list(tmp_path.glob(".out.partial"))


def test_the_cli_refuses_and_writes_it_with_force(unservable, tmp_path):
    src, reason = unservable
    dst = tmp_path / "out"
    runner = CliRunner()
    refused = runner.invoke(_cli(), ["convert", str(src), str(dst)])
    assert refused.exit_code == 2, refused.output
    assert f"error: not writing {dst}: the mesh could not serve it:" in refused.output
    assert reason in refused.output and "--force" in refused.output
    assert not dst.exists()

    forced = runner.invoke(_cli(), ["convert", str(src), str(dst), "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"warning: written with --force, but the mesh will refuse it: {reason}" in forced.output
    assert f"wrote {dst}" in forced.output
    Checkpoint.open(dst)  # written in full, in the native layout
    assert serve_refusals(dst) == [reason]
