#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv: the CPU build of torch first, so
# that nothing later pulls a CUDA build, then the package itself with its CPU and test extras.
# Idempotent: does nothing when .venv is current with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
# torch==2.13.0 resolves to the CPU build on these machines; pinning it here keeps a CUDA build out.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[cpu,test]"
echo "$want" > "$stamp"
echo "environment ready in $VENV"
