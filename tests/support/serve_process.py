"""`internvl-mesh serve` as a user runs it: a subprocess with its own Ray, in its own process group,
ready once it prints "internvl-mesh: ready." (Serve's own log says "Application '...' is ready." of
each application); killed (group and all) when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port

READY = "internvl-mesh: ready."
# Two CPU cores in CI: the deployments ask for half a CPU each so all of them fit.
SMALL_CPU = [
    "--set",
    "models.0.decoder.num_cpus=0.5",
    "--set",
    "models.0.encoder.num_cpus=0.5",
    "--set",
    "preprocess_deployment.num_cpus=0.5",
    "--set",
    "gateway_deployment.num_cpus=0.5",
]


@contextlib.contextmanager
def serve_process(log: Path, *args: str, ready_timeout_s: float = 240, small_cpu: bool = True):
    """``small_cpu`` False runs the deployments with their default CPU requests, as a user's ``serve``
    does (the local Ray then gets more logical CPUs than the machine has cores)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        sys.executable, "-m", "mesh.cli", "serve",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--set", f"gateway.metrics_port={metrics_port}", *(SMALL_CPU if small_cpu else ()), *args,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while READY not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not become ready:\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield {
            "proc": proc,
            "base": f"http://127.0.0.1:{http_port}",
            "log": log,
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
