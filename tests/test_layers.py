"""Layering rules (DESIGN.md): the core never imports plans or devices; devices and plans
know nothing of the simulator; runtime code never imports tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIRING = {"session.py", "cli.py"}  # the session layer, shipped inside the package


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            out.add(("." * node.level) + mod)
            out.update(
                ("." * node.level) + (mod + "." if mod else "") + a.name for a in node.names
            )
    return out


CORE = sorted(p for p in (ROOT / "bluesky_deepfocus").glob("*.py") if p.name not in WIRING)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_never_imports_plans_or_devices(path):
    bad = {m for m in imports(path) if any(k in m for k in ("plans", "devices", "tests"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "devices").glob("*.py")) + sorted((ROOT / "plans").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_devices_and_plans_know_nothing_of_the_simulator(path):
    bad = {m for m in imports(path) if "sim" in m.split(".") or m.endswith(".sim") or "tests" in m}
    assert not bad, f"{path} imports {sorted(bad)}"
