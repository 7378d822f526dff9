#!/usr/bin/env bash
# Regenerates the Python stubs of protos/ into gen/python/. The stubs are committed; CI reruns this
# and fails on any difference (see .ci/run), so a .proto change without regenerated stubs never lands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf gen/python/internvl
mkdir -p gen/python
mapfile -t files < <(cd protos && find internvl -name '*.proto' | sort)
(cd protos && "../$PY" -m grpc_tools.protoc -I . --python_out=../gen/python --pyi_out=../gen/python \
  --grpc_python_out=../gen/python "${files[@]}")
find gen/python/internvl -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;
