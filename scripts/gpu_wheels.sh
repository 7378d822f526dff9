#!/usr/bin/env bash
# Download the wheels the GPU machine lacks for tests/gpu/gpu_check.py into DIR (kept under 64 MiB).
#
# The machine has torch, triton, grpcio, protobuf, pyyaml, typer and prometheus-client, no network,
# and an older transformers. What the decoder (engine, models, attention, config.py and the
# services/common modules they pull) imports beyond that: pydantic (config.py, common/config.py) with
# its parts. The kit also drives transformers, pinned here to this project's versions with what they
# import. Install there with:
#   pip install --no-index --target /tmp/wheels-site DIR/*.whl
#   PYTHONPATH=/tmp/wheels-site:. python tests/gpu/gpu_check.py --out OUT
set -euo pipefail
DIR=${1:?usage: scripts/gpu_wheels.sh DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$DIR"

# name==version of each, as this project's venv has it
PINS=$("$PY" - <<'PY'
import importlib.metadata as md
names = [
    # pydantic and its parts (services/decoder/config.py, services/common/config.py)
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    # transformers and what it and huggingface-hub import
    "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "httpx2", "httpcore2",
    "h11", "anyio", "sniffio", "idna", "certifi", "truststore", "regex", "filelock", "fsspec", "tqdm",
    "packaging", "click",
]
pins = []
for name in names:
    try:
        pins.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass  # not in this venv: not something this project's transformers needs
print(" ".join(pins))
PY
)
echo "downloading: $PINS"
# shellcheck disable=SC2086
python3 -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --no-deps \
    --dest "$DIR" $PINS
SIZE=$(du -sm "$DIR" | cut -f1)
echo "$DIR: ${SIZE} MiB in $(ls "$DIR"/*.whl | wc -l) wheels"
if [ "$SIZE" -ge 64 ]; then
    echo "over 64 MiB: the device copy will not carry it" >&2
    exit 1
fi
