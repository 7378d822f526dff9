"""A short, bounded run of the image-decoding fuzz target (``fuzz_decode.py``) in CI.

The target runs in a subprocess (libFuzzer owns the process it runs in and exits on a finding),
seeded with one valid image per format, for a fixed wall time; the test fails if the fuzzer reports
a crash, a per-input timeout or an out-of-memory. Longer runs are the same command with a larger
``-max_total_time``.

Memory is bounded by an address-space limit set on the target process, not by libFuzzer's
``-rss_limit_mb``: Linux carries a process's peak RSS across ``exec``, so a target started from a test
process that has grown past the limit would report an out-of-memory on its first input. Past the
address-space limit an allocation raises ``MemoryError``, which the fuzzer reports as a crash.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import atheris  # noqa: F401  (a test dependency: missing, the suite fails here rather than skipping)

TARGET = Path(__file__).with_name("fuzz_decode.py")
REPO = Path(__file__).resolve().parents[2]
SECONDS = 8
ADDRESS_SPACE_BYTES = 3 << 30

# Sets the limit, then becomes the target (same argv): the limit is inherited across exec.
_LIMITED_EXEC = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def test_decode_image_survives_a_short_fuzzing_run(tmp_path):
    from tests.fuzz.fuzz_decode import write_seeds

    corpus = tmp_path / "corpus"
    write_seeds(corpus)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _LIMITED_EXEC,
            str(ADDRESS_SPACE_BYTES),
            sys.executable,
            str(TARGET),
            str(corpus),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            "-rss_limit_mb=0",
            "-max_len=65536",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 60,
    )
    log = proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "Done" in proc.stderr, log
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), log
