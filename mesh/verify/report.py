"""The verdicts of ``verify``: one ``CheckResult`` per check, gathered in a ``Report``.

The same facts are printed (one line per check: PASS or FAIL, the measured figure, the tolerance) and
written as JSON (``Report.to_json``); ``Report.passed`` decides the exit code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckResult:
    """One check's verdict. ``figure`` and ``tolerance`` are what a person reads; ``measured`` holds the
    same numbers for machines; ``details`` say where a failing check went wrong."""

    name: str
    passed: bool
    figure: str
    tolerance: str
    measured: dict[str, float | int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<10}  {self.figure}  (tolerance: {self.tolerance})"


@dataclass(frozen=True)
class ImageFacts:
    """A built-in image as the checks used it."""

    name: str
    width: int
    height: int
    grid: tuple[int, int]
    tiles: int
    prompt: str


@dataclass
class Report:
    model: str
    reference: str
    device: str
    dtype: str
    dtype_source: str
    max_num: int
    max_new_tokens: int
    images: list[ImageFacts]
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def header(self) -> str:
        ref = "" if self.reference == self.model else f" against reference {self.reference}"
        tiles = sum(i.tiles for i in self.images)
        return (
            f"verify {self.model}{ref}: {self.device}, {self.dtype} ({self.dtype_source}), "
            f"{len(self.images)} images ({tiles} tiles, max_num {self.max_num}), "
            f"{self.max_new_tokens} new tokens per request"
        )

    def lines(self) -> list[str]:
        out = [self.header()]
        for check in self.checks:
            out.append(check.line())
            if not check.passed:
                out += [f"      {d}" for d in check.details]
        passed = sum(c.passed for c in self.checks)
        out.append(f"{'PASS' if self.passed else 'FAIL'}: {passed} of {len(self.checks)} checks passed")
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data
