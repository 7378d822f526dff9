"""Every Serve import_path of the rendered chart imports on the CPU environment without CUDA.

The head (CPU image) builds every application, the encoder's and decoder's included, so each
import_path must import there, and importing must not initialise a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helm import chartkit

_PROBE = r"""
import importlib, json, sys, traceback
results = {}
for path in sys.argv[1:]:
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
        results[path] = "ok" if callable(obj) else f"{attr} is not callable"
    except Exception:
        results[path] = traceback.format_exc(limit=3)
import torch
results["__cuda_initialized__"] = torch.cuda.is_initialized()
print(json.dumps(results))
"""


def _import_paths() -> list[str]:
    paths: list[str] = []
    for case in [[]] + [[e] for e in chartkit.EXAMPLES]:
        for app in chartkit.serve_config(chartkit.render(case))["applications"]:
            if app["import_path"] not in paths:
                paths.append(app["import_path"])
    return paths


IMPORT_PATHS = _import_paths()


@pytest.fixture(scope="module")
def probe():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *IMPORT_PATHS],
        capture_output=True,
        text=True,
        cwd=chartkit.ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("import_path", IMPORT_PATHS)
def test_import_path_imports(probe, import_path):
    assert probe[import_path] == "ok", probe[import_path]


def test_importing_initialises_no_gpu(probe):
    assert probe["__cuda_initialized__"] is False
