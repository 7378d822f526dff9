"""``internvl-mesh config render`` validates every service's settings: a typo fails there, with its path,
not when a replica starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml


def render(*sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mesh.cli", "config", "render", "--model", "/models/m"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "setting",
    [
        "models.0.decoder_settings.cache.block_sise=16",
        "models.0.decoder_settings.scheduler.max_num_seqs=0",
        "models.0.encoder_settings.batching.max_batch_tilez=8",
        "models.0.encoder_settings.fallback=sideways",
        "preprocess.max_images_per_requestt=4",
        "gateway.ops.usage.strem=x",
    ],
)
def test_a_bad_service_setting_fails_with_its_field_path(setting):
    done = render(setting)
    assert done.returncode != 0, done.stdout
    path = setting.split("=")[0]
    assert path in done.stderr + done.stdout, done.stderr


def test_good_settings_render_as_set():
    done = render(
        "models.0.decoder_settings.cache.block_size=32",
        "models.0.encoder_settings.batching.max_batch_tiles=8",
        "preprocess.max_images_per_request=4",
    )
    assert done.returncode == 0, done.stderr
    apps = {a["name"]: a for a in yaml.safe_load(done.stdout)["applications"]}
    assert apps["decoder-m"]["args"]["settings"] == {"cache": {"block_size": 32}}
    assert apps["encoder-m"]["args"]["settings"] == {"batching": {"max_batch_tiles": 8}}
    assert apps["preprocess"]["args"]["config"] == {"max_images_per_request": 4}


def _ongoing(cfg: dict, app: str) -> int:
    (found,) = [a for a in cfg["applications"] if a["name"] == app]
    return found["args"]["deployment_options"]["max_ongoing_requests"]


@pytest.mark.parametrize("max_num_seqs", [8, 64])
def test_the_backlog_waits_in_the_fair_queues_not_in_serves_router(max_num_seqs):
    # Serve's router queues requests beyond max_ongoing_requests in arrival order: by default a decoder
    # replica takes a full batch and three waiting, the encoder and the gateway 256
    done = render(f"models.0.decoder_settings.scheduler.max_num_seqs={max_num_seqs}")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert _ongoing(cfg, "decoder-m") == max(32, 4 * max_num_seqs)
    assert _ongoing(cfg, "encoder-m") == 256 and _ongoing(cfg, "gateway") == 256
    done = render("models.0.decoder.max_ongoing_requests=7")  # a value set in the config wins
    assert _ongoing(yaml.safe_load(done.stdout), "decoder-m") == 7
