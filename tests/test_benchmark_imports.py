"""Every ``from thawed... import name`` in ``benchmarks/`` and ``scripts/`` resolves.

Benchmarks import thawed inside their functions (so ``--help`` stays fast), so a module that moves
(``runtime/compress/`` took the offline pipeline) breaks them only when that line runs, often after
minutes of work. This reads their imports with ``ast`` and resolves each one, without running them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")])


def _thawed_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "thawed":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "thawed"]
    return out


def test_the_benchmarks_are_found():
    assert len(FILES) >= 10 and any(f.name == "heal.py" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_thawed_import_resolves(path):
    missing = []
    for line, module, names in _thawed_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"line {line}: {module} ({exc})")
            continue
        for name in names:
            if name != "*" and not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"line {line}: {module} has no {name!r}")
    assert not missing, f"{path.name}: " + "; ".join(missing)
