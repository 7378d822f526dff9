"""What ``serve`` runs when no model is given: the shipped demo model, else a tiny random checkpoint."""

import services.demo
from mesh.cli import DEFAULT_MODEL_DIR, _default_model
from services.common.checkpoint import Checkpoint
from services.common.errors import MeshError
from services.demo import DEMO_MODEL_NAME, demo_model_path


def test_default_model_is_the_shipped_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tiny fallback would be written under the working directory
    name, path = _default_model()
    said = capsys.readouterr().out
    assert (name, path) == (DEMO_MODEL_NAME, demo_model_path())
    assert f"embedded demo model {DEMO_MODEL_NAME}" in said
    assert not (tmp_path / DEFAULT_MODEL_DIR).exists()


def test_without_the_demo_a_tiny_checkpoint_is_made(tmp_path, monkeypatch, capsys):
    def missing():
        raise MeshError("no demo model in this install")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(services.demo, "demo_model_path", missing)
    name, path = _default_model()
    said = capsys.readouterr().out
    assert name == "internvl-mesh-tiny" and path == DEFAULT_MODEL_DIR
    assert "RANDOM-WEIGHT" in said
    assert Checkpoint.open(tmp_path / DEFAULT_MODEL_DIR).identity()
