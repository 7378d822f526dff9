"""The import rules of the layout, checked by walking every module's imports (top level and inside
functions alike), so that they stay true.

- ``services/common`` is the floor: it imports no other package of ours but itself.
- ``services/embedding_cache`` is shared by the encoder and the decoder and imports neither.
- The encoder and the decoder do not import each other, and the gateway does not reach into the
  encoder: it talks to it through handles and the types in ``services/common`` (it builds the decoder's
  request type, ``services.decoder.types``, and reads its events).
- ``services`` never imports ``gateway``; neither imports ``mesh``, the composition package that puts
  them together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "gateway", "mesh")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every absolute module name a file imports, relative imports resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[_module_name(path)] = {name for name in _imports(path) if name.split(".")[0] in PACKAGES}
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# (modules under this prefix, may not import anything under these prefixes)
RULES = [
    ("services.common", ("services.preprocess", "services.encoder", "services.decoder",
                         "services.embedding_cache", "services.convert", "services.demo")),
    ("services.embedding_cache", ("services.encoder", "services.decoder", "services.preprocess")),
    ("services.decoder", ("services.encoder",)),
    ("services.encoder", ("services.decoder",)),
    ("gateway", ("services.encoder", "mesh")),
    ("services", ("gateway", "mesh")),
]  # fmt: skip


@pytest.mark.parametrize("owner,forbidden", RULES, ids=[r[0] for r in RULES])
def test_import_rules(owner, forbidden):
    graph = _graph()
    assert any(_within(m, owner) for m in graph), f"no module under {owner}: the rule checks nothing"
    broken = sorted(
        f"{module} imports {name}"
        for module, names in graph.items()
        if _within(module, owner)
        for name in names
        if any(_within(name, f) for f in forbidden)
    )
    assert not broken, "\n".join(broken)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level import counts, and a relative import is resolved."""
    pkg = tmp_path / "services" / "decoder"
    pkg.mkdir(parents=True)
    probe = pkg / "probe.py"
    probe.write_text("def f():\n    from services.encoder import core\n\nfrom . import types\n")
    assert {"services.encoder.core", "services.decoder.types"} <= _imports(probe, tmp_path)
