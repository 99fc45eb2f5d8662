"""The architecture's rules, checked on the code itself (README, "Architecture").

* No import cycle between modules, imports inside functions included (grimp reads every import
  statement of every module, wherever it sits).
* No private name (``_x``) imported from another package.
* The wheel's only top-level import name is ``lowdiff`` (the folders service/, engines/ and export/
  are its subpackages).

The layer order itself is import-linter's contract in pyproject.toml (``lint-imports`` in .ci/run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowdiff"


def module_cycles(graph: object) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):  # type: ignore[attr-defined]
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            self_loop = v in graph.find_modules_directly_imported_by(v)  # type: ignore[attr-defined]
            if len(component) > 1 or self_loop:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):  # type: ignore[attr-defined]
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph("lowdiff", include_external_packages=False, cache_dir=None)
    assert len(graph.modules) > 40  # the whole tree was found, service/engines/export included
    assert {"lowdiff.service.app", "lowdiff.engines.cudagraph", "lowdiff.export.manifest"} <= graph.modules
    assert module_cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert module_cycles(graph) == [["a.x", "a.y"]]


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def private_imports_across_packages() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts)
        is_package = path.name == "__init__.py"
        if is_package:
            module = module.removesuffix(".__init__")
        own_package = _package_of(module, is_package)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowdiff"):
                target = node.module
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        target_package = (
                            target.rpartition(".")[0]
                            if (ROOT / (target.replace(".", "/") + ".py")).is_file()
                            else target
                        )
                        if target_package != own_package:
                            found.append(f"{module}: from {target} import {alias.name}")
    return found


def test_no_private_name_crosses_a_package_boundary() -> None:
    assert private_imports_across_packages() == []


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lowdiff_serve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lowdiff"}
    for sub in ("service/app.py", "engines/cudagraph.py", "export/manifest.py", "weights/fashion32.pt", "__main__.py"):
        assert f"lowdiff/{sub}" in names
