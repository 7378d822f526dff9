"""A checkpoint that the encoder or the decoder would refuse is refused by ``serve`` and ``serve-grpc``
before anything starts: the real CLI in a subprocess exits in seconds with code 2, the model's name,
its path and the reason, no traceback, and without ever importing Ray (so no Ray was started and no
session directory written). The mesh's own check passes a checkpoint every service can serve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port

# The CLI's entry point (``internvl-mesh`` runs ``mesh.cli:main``), reporting on exit whether Ray
# was ever imported: serve cannot start Ray without importing it.
PROBE = (
    "import sys\n"
    "from mesh.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    print('ray imported:', 'ray' in sys.modules, file=sys.stderr)\n"
)

# A bound on the hang this guards against (Serve retrying a failing deployment for ~40 s), not a
# speed measurement: the check itself takes a few seconds.
BOUND_S = 20


def _refused_copy(tiny_checkpoint: Path, out: Path, edit) -> Path:
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _run_cli(tmp_path: Path, *args: str) -> tuple[int, str, float]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(tmp_path),
        "RAY_TMPDIR": str(tmp_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # with whatever it started
        out, _ = proc.communicate()
        pytest.fail(f"the CLI was still running after 120 s: it did not refuse early:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - start


def _assert_refused(rc: int, out: str, elapsed: float, name: str, path: Path, reason: str) -> None:
    assert rc == 2, out
    assert f"error: model {name!r} ({path}) cannot be served:" in out, out
    assert reason in out, out
    assert "Traceback" not in out, out
    assert "ray imported: False" in out, out
    assert elapsed < BOUND_S, f"took {elapsed:.1f} s:\n{out}"


DECODER_REFUSED = (
    lambda c: c["text_config"].update(model_type="mamba"),
    "decoder: language model type 'mamba' is not supported",
)
ENCODER_REFUSED = (
    lambda c: c["vision_config"].update(hidden_act="relu"),
    "encoder: unsupported activation 'relu'",
)


@pytest.mark.parametrize("edit,reason", [DECODER_REFUSED, ENCODER_REFUSED], ids=["decoder", "encoder"])
def test_serve_refuses_before_ray_starts(tiny_checkpoint, tmp_path, edit, reason):
    model = _refused_copy(tiny_checkpoint, tmp_path / "refused-model", edit)
    ports = ["--http-port", str(free_port()), "--grpc-port", "0", "--set", "gateway.metrics_port=0"]
    rc, out, elapsed = _run_cli(tmp_path, "serve", "--model", str(model), *ports)
    _assert_refused(rc, out, elapsed, "refused-model", model.resolve(), reason)
    assert not any(tmp_path.glob("**/session_*")), "a Ray session directory was written"


def test_serve_grpc_refuses_what_the_encoder_refuses(tiny_checkpoint, tmp_path):
    edit, reason = ENCODER_REFUSED
    model = _refused_copy(tiny_checkpoint, tmp_path / "refused-vision", edit)
    rc, out, elapsed = _run_cli(tmp_path, "serve-grpc", "--model", str(model), "--port", "0")
    _assert_refused(rc, out, elapsed, "refused-vision", model, reason)


def test_check_models_names_every_refused_model_and_passes_the_rest(tiny_checkpoint, tmp_path):
    from mesh.support import CheckpointRefused, check_models
    from mesh.topology import MeshConfig

    decoder = _refused_copy(tiny_checkpoint, tmp_path / "d", DECODER_REFUSED[0])
    both = _refused_copy(
        tiny_checkpoint, tmp_path / "both", lambda c: (DECODER_REFUSED[0](c), ENCODER_REFUSED[0](c))
    )
    models = [("good", tiny_checkpoint), ("d", decoder), ("both", both)]
    cfg = MeshConfig.model_validate({"models": [{"name": n, "path": str(p)} for n, p in models]})
    with pytest.raises(CheckpointRefused) as caught:
        check_models(cfg)
    message = caught.value.message
    assert "'good'" not in message
    assert f"model 'd' ({decoder}) cannot be served:\n  {DECODER_REFUSED[1]}" in message
    assert f"model 'both' ({both}) cannot be served:\n  {ENCODER_REFUSED[1]}" in message
    assert message.count(DECODER_REFUSED[1]) == 2
    check_models(MeshConfig.model_validate({"models": [{"name": "good", "path": str(tiny_checkpoint)}]}))


def test_settings_take_part_in_the_check(tiny_checkpoint):
    """The check uses the configs the replicas build: a setting the decoder refuses is refused too."""
    from mesh.support import CheckpointRefused, check_models
    from mesh.topology import MeshConfig

    model = {
        "name": "tiny",
        "path": str(tiny_checkpoint),
        "decoder_settings": {"scheduler": {"max_model_len": 1 << 20}},
    }
    with pytest.raises(CheckpointRefused, match=r"decoder: scheduler.max_model_len=1048576 exceeds"):
        check_models(MeshConfig.model_validate({"models": [model]}))
