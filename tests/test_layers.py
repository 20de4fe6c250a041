"""The package's folders are its layers: each imports only from the layers below it.

``docs/architecture.md`` draws the same graph. A new import that points up (``core``
reaching into ``vllm``, ``sim`` into ``lab``) fails here, naming the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "continuum_tiered"

# Each subpackage and what it may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "policies": {"core"},
    "traces": {"core"},
    "client": {"core"},
    "profiling": {"core"},
    "vllm": {"core", "policies"},
    "replay": {"core", "client", "traces"},
    "sim": {"core", "policies", "traces", "vllm"},
    "cluster": {"core", "client", "vllm"},
    "lab": {
        "core",
        "policies",
        "traces",
        "client",
        "profiling",
        "vllm",
        "replay",
        "sim",
        "cluster",
    },
}


def imported_subpackages(path: Path) -> set[str]:
    """The ``continuum_tiered`` subpackages a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = (
                [f"{node.module}.{alias.name}" for alias in node.names]
                if node.module == "continuum_tiered"
                else [node.module]
            )
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "continuum_tiered" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules_of(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def test_every_subpackage_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(ALLOWED)


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_imports_point_only_down(subpackage: str) -> None:
    upward = {
        str(path.relative_to(PACKAGE)): sorted(wrong)
        for path in modules_of(subpackage)
        if (wrong := imported_subpackages(path) - ALLOWED[subpackage] - {subpackage})
    }
    assert not upward, f"imports that point up from {subpackage}/: {upward}"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from continuum_tiered.lab import demo\nfrom continuum_tiered import sim\n"
    )
    assert imported_subpackages(module) == {"lab", "sim"}
