"""The ``tiles`` command through typer, as the top-level CLI will register it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from services.demo.reference import reference_tiles
from services.preprocess.cli import tiles_command
from tests.support.images import encode, photo_like

app = typer.Typer()
app.command("tiles")(tiles_command)


@app.callback()
def _root() -> None:
    """Make ``tiles`` a subcommand, as in the real CLI."""


runner = CliRunner()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    path.write_bytes(encode(photo_like(1920, 1080, seed=1), "JPEG"))
    return path


def test_text_output(photo: Path) -> None:
    result = runner.invoke(app, ["tiles", str(photo)])
    assert result.exit_code == 0, result.output
    assert "4x2" in result.stdout
    assert "9 (incl. thumbnail)" in result.stdout
    assert "2304" in result.stdout


def test_json_output(photo: Path) -> None:
    result = runner.invoke(app, ["tiles", str(photo), "--json", "--max-num", "40"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["grid"] == {"cols": 7, "rows": 4}
    assert facts["tiles"] == 29
    assert facts["image_tokens"] == 29 * 256
    assert (facts["width"], facts["height"]) == (1920, 1080)
    assert facts["thumbnail"] is True


def test_no_thumbnail(photo: Path) -> None:
    result = runner.invoke(app, ["tiles", str(photo), "--json", "--no-thumbnail"])
    facts = json.loads(result.stdout)
    assert facts["tiles"] == 8
    assert facts["thumbnail"] is False


def test_writes_tiles_thumbnail_last(photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tiles", str(photo), "--out", str(tmp_path / "tiles")])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "tiles").iterdir())
    assert [p.name for p in written] == [f"tile_{k:03d}.png" for k in range(9)]
    expected = reference_tiles(photo.read_bytes())
    for k, path in enumerate(written):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected[k])


@pytest.mark.parametrize(
    ("content", "args", "needle"),
    [
        (b"just text", [], "not a supported image format"),
        (b"", [], "empty"),
        (None, ["--max-num", "0"], "max_num"),
        (None, ["--min-num", "5", "--max-num", "2"], "min_num"),
    ],
)
def test_bad_input_exits_2_without_traceback(
    tmp_path: Path, photo: Path, content: bytes | None, args: list[str], needle: str
) -> None:
    path = photo
    if content is not None:
        path = tmp_path / "input.bin"
        path.write_bytes(content)
    result = runner.invoke(app, ["tiles", str(path), *args])
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tiles", str(tmp_path / "nope.png")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr
