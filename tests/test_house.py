"""The house rules on size: no file over 600 lines outside generated code (``gen/``), no function or
method over 80 lines outside the benchmarks. Both walk the repository's own Python files."""

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# not ours: generated code, environments, tools and hidden or build directories
SKIPPED_DIRS = {"gen", "build", "dist", "node_modules", "__pycache__"}


def python_files(skip: frozenset[str] = frozenset()) -> list[Path]:
    """The repository's ``.py`` files, relative to its root, outside ``SKIPPED_DIRS``, hidden directories
    (``.venv``, ``.tools``, ...) and the top-level directories in ``skip``."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in SKIPPED_DIRS
            and not d.endswith(".egg-info")
            and not (here == Path(".") and d in skip)
        )
        found += [here / f for f in sorted(files) if f.endswith(".py")]
    return found


def function_lengths(skip: frozenset[str] = frozenset()) -> dict[str, int]:
    """``"path:function"`` → lines (``end_lineno - lineno + 1``) of every function and method; a name
    defined twice in one file keeps its longest definition."""
    lengths: dict[str, int] = {}
    for relative in python_files(skip):
        tree = ast.parse((ROOT / relative).read_text("utf-8"), filename=str(relative))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{relative.as_posix()}:{node.name}"
                lengths[key] = max(lengths.get(key, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_the_walk_finds_the_code():
    files = {p.as_posix() for p in python_files()}
    assert "mesh/topology.py" in files and "tests/test_house.py" in files
    assert not any(f.startswith(("gen/", ".venv/")) for f in files)


def test_no_file_over_600_lines():
    too_long = {}
    for relative in python_files():
        lines = len((ROOT / relative).read_text("utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long[relative.as_posix()] = lines
    assert not too_long, f"files over {MAX_FILE_LINES} lines (split them by concept): {too_long}"


def test_no_function_over_80_lines():
    lengths = function_lengths(skip=frozenset({"benchmarks"}))
    too_long = {k: n for k, n in sorted(lengths.items()) if n > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps): {too_long}"
