"""Verdicts, the JSON report rewritten after every stage, and the loop that runs the stages.

A verdict is ``PASS`` / ``FAIL`` / ``INCONCLUSIVE`` with the measured figure and the threshold it was
held to, both as text with their units. A stage that raises records its traceback and the kit goes on.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


@dataclass(frozen=True)
class Verdict:
    check: str
    status: str  # PASS | FAIL | INCONCLUSIVE
    measured: str  # the figure, with its unit
    threshold: str  # what it was held to

    def line(self, stage: str) -> str:
        return f"{self.status} {stage}.{self.check}: {self.measured} ({self.threshold})"


def judge(check: str, ok: bool, measured: str, threshold: str) -> Verdict:
    return Verdict(check, PASS if ok else FAIL, measured, threshold)


@dataclass
class StageResult:
    name: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)  # JSON data: measured numbers, with units in keys
    verdicts: list[Verdict] = field(default_factory=list)
    error: str | None = None

    def add(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        print(verdict.line(self.name), flush=True)


@dataclass
class Context:
    """What every stage is given: where to run, how big, and a scratch folder for checkpoints."""

    device: str  # "cuda" | "cpu"
    smoke: bool
    work: Path
    bounds: dict[str, float] = field(default_factory=dict)  # stage 0's measured bandwidth and TFLOP/s
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # stage 3, per batch, for stage 4


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


Stage = Callable[[Context, StageResult], None]


class Report:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.stages: list[StageResult] = []

    def write(self) -> None:
        body = {**self.header, "stages": [asdict(s) for s in self.stages]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2, default=str))
        tmp.replace(self.path)

    @property
    def failed(self) -> bool:
        return any(s.error or any(v.status == FAIL for v in s.verdicts) for s in self.stages)

    def run(self, number: int, name: str, stage: Stage, ctx: Context) -> None:
        result = StageResult(f"{number}_{name}")
        self.stages.append(result)
        print(f"== stage {result.name}", flush=True)
        start = time.perf_counter()
        try:
            stage(ctx, result)
        except Exception:  # the kit goes on: a later stage's figures are worth having
            result.error = traceback.format_exc()
            print(f"FAIL {result.name}.error: raised\n{result.error}", flush=True)
        finally:
            free_memory(ctx.device)  # the stage's models are unreachable now
            result.seconds = round(time.perf_counter() - start, 3)
            self.write()
