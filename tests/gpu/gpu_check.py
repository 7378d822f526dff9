"""One-shot GPU verification of the decoder and the encoder (one H100/H200, no Ray, under 5 minutes).

    python tests/gpu/gpu_check.py --out DIR [--device cuda|cpu] [--smoke] [--stages 0,1,2,3,4,5]

Stages (one module each under ``tests/gpu/kit/``):

0. versions; measured device-to-device copy bandwidth and bf16 GEMM TFLOP/s (the bounds later figures
   are divided by); which SDPA backends accept the engine's decode shapes;
1. tiny checkpoint: every parameter, buffer and KV cache tensor of the engine on the device; one
   request end to end;
2. fidelity in bf16 against transformers fp32 (tiny checkpoint, and a 4-layer random checkpoint with
   Qwen2.5-1.5B's widths outside ``--smoke``); 16 mixed requests batched vs alone;
3. decode throughput at batch 1/8/32/64/128, 1024-token prompts, 64 steps, with the percent of the
   bandwidth bound;
4. transformers ``generate`` at batch 1 and padded 32 on the same model, and the engine's ratio to it;
5. the vision encoder at 1/8/32/64 tiles: pinned vs pageable copies, forward time, fp32 parity.

Every verdict prints as ``PASS|FAIL|INCONCLUSIVE stage.check: measured (threshold)``; ``DIR/gpu_check.json``
is rewritten after every stage, so a run cut short still leaves what finished. A stage that raises
records its traceback and the next stage runs. Exit status 0 only when nothing FAILs and no stage raised.
``--smoke`` shrinks every size so that ``--device cpu --smoke`` runs in seconds (the test suite runs it).

The GPU machine has torch, triton, grpcio, protobuf, pyyaml, typer and prometheus-client but no pydantic
(which ``services/decoder/config.py`` imports) and an older transformers. Carry the wheels that
``scripts/gpu_wheels.sh DIR`` downloads here (pydantic and its parts, and transformers, tokenizers,
safetensors, huggingface-hub pinned to this project's versions, with what they import), then there:

    pip install --no-index --target /tmp/wheels-site DIR/*.whl
    PYTHONPATH=/tmp/wheels-site:. python tests/gpu/gpu_check.py --out /tmp/gpu-out
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: ``services`` is the repository's
    sys.path.insert(0, str(ROOT))

from kit import (  # noqa: E402 - after the path set-up above
    stage0_device,
    stage1_smoke,
    stage2_fidelity,
    stage3_decode,
    stage4_peer,
    stage5_encoder,
)
from kit.report import Context, Report  # noqa: E402

STAGES = {
    0: ("device", stage0_device.run),
    1: ("smoke", stage1_smoke.run),
    2: ("fidelity", stage2_fidelity.run),
    3: ("decode", stage3_decode.run),
    4: ("peer", stage4_peer.run),
    5: ("encoder", stage5_encoder.run),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes everywhere (seconds on a CPU)")
    ap.add_argument("--stages", default=",".join(map(str, STAGES)), help="comma-separated stage numbers")
    args = ap.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {sorted(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL setup.cuda: no CUDA device visible (a CUDA device)", flush=True)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = Report(
        args.out / "gpu_check.json", {"device": args.device, "smoke": args.smoke, "stages_asked": args.stages}
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(device=args.device, smoke=args.smoke, work=Path(work))
        for number in args.stages:
            name, stage = STAGES[number]
            report.run(number, name, stage, ctx)
    report.write()
    print(f"wrote {report.path}: {'FAIL' if report.failed else 'no FAIL'}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
