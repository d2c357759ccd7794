"""The folders are the architecture (ARCHITECTURE.md): each imports only folders below it,
so no folder imports one that imports it back. Read from the code's own imports."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A package may import its own layer's packages only where listed in SIDEWAYS.
LAYERS: list[set[str]] = [
    {"schemas"},
    {"operators"},
    {"runtime"},
    {"state"},
    {"sinks"},
    {"connectors"},
    {"dataflows", "serving"},
    {"ops"},
    {"devkit"},
    {"tallyflow"},
]
SIDEWAYS: set[tuple[str, str]] = set()
FRAMEWORK = {"bytewax"}  # the engine: only behind the seam
SEAM = {"connectors", "dataflows", "runtime", "ops", "devkit"}


def rank(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def imports(path: Path) -> set[str]:
    """Top-level names this file imports, anywhere in it (also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_every_package_is_in_a_layer_and_installed():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p for layer in LAYERS for p in layer} == set(packages)
    assert all((ROOT / p / "__init__.py").exists() for p in packages)


def test_no_folder_imports_a_folder_above_it():
    ours = {p for layer in LAYERS for p in layer}
    wrong: list[str] = []
    for pkg in ours:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for dep in imports(f) & ours:
                if dep != pkg and (rank(dep) > rank(pkg) or (rank(dep) == rank(pkg) and (pkg, dep) not in SIDEWAYS)):
                    wrong.append(f"{f.relative_to(ROOT)} imports {dep}")
            if imports(f) & FRAMEWORK and pkg not in SEAM:
                wrong.append(f"{f.relative_to(ROOT)} imports Bytewax outside the seam")
    assert not wrong, "\n".join(wrong)


def test_operators_and_schemas_are_framework_free():
    """The pure core: no Kafka, Redis, HTTP or Bytewax, so every rule is testable alone."""
    banned = {"bytewax", "confluent_kafka", "redis", "httpx", "prometheus_client"}
    for pkg in ("schemas", "operators"):
        for f in (ROOT / pkg).rglob("*.py"):
            assert not imports(f) & banned, f"{f.relative_to(ROOT)} imports {imports(f) & banned}"
