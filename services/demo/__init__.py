"""The demo model: a small InternVL trained here on a synthetic shapes task (``services.demo.task``).

The checkpoint shipped in ``services/demo/model`` (package data) is what ``serve`` runs when no model is
given, so the first answer a newcomer sees can be checked by eye (``docs/demo-model.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from services.common.errors import FailedPrecondition

DEMO_MODEL_NAME = "internvl-mesh-demo"


def demo_model_path() -> Path:
    """The shipped checkpoint directory (package data of ``services.demo``)."""
    path = Path(str(resources.files("services.demo").joinpath("model")))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FailedPrecondition(
            f"no trained demo model is shipped in {path} yet: pass --model (a `train-demo` output)"
        )
    return path
