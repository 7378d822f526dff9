"""What `serve` and `serve-grpc` run when no model is given: the shipped demo model, else a tiny
random-weight checkpoint made on the spot."""

from services.cli import DEFAULT_MODEL_DIR, _default_model
from services.common.checkpoint import Checkpoint
from services.demo import DEMO_MODEL_NAME, demo_model_path
from tests.demo.conftest import _shipped


def test_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tiny fallback is written under the working directory
    name, path = _default_model()
    said = capsys.readouterr().out
    if _shipped():
        assert (name, path) == (DEMO_MODEL_NAME, demo_model_path())
        assert f"embedded demo model {DEMO_MODEL_NAME}" in said
        assert not (tmp_path / DEFAULT_MODEL_DIR).exists()
    else:
        assert name == "internvl-mesh-tiny" and path == DEFAULT_MODEL_DIR
        assert "RANDOM-WEIGHT" in said
        assert Checkpoint.open(tmp_path / DEFAULT_MODEL_DIR).identity()
