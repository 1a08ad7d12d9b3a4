"""The layout's import rules (DESIGN.md): trainer <- core <- api / worker, and the client needs no
server code. Read from the source (every import, at any depth), so a lazy import breaks it too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "core", "api", "worker", "client", "migrations")
# What each package may not import from.
FORBIDDEN = {
    "trainer": {"core", "api", "worker", "client"},
    "core": {"api", "worker", "client"},
    "api": {"worker", "client"},
    "worker": {"api", "client"},
    "client": {"core", "api", "worker"},
    "migrations": {"api", "worker", "client"},
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level?) of every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], id(node) in top_level))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package: str) -> None:
    broken = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name, at_top in _imports(path):
            if name in FORBIDDEN[package]:
                broken.append(f"{path.relative_to(REPO)} imports {name}")
            # The client's local `train` and `bench` commands run the trainer: lazily, inside the command.
            if package == "client" and name == "trainer" and at_top:
                broken.append(f"{path.relative_to(REPO)} imports trainer at module level")
    assert broken == []
