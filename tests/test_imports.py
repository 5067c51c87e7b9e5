"""Import hygiene, read from the source with ``ast`` (nothing is imported).

1. No import cycle between slimkit's packages (``encode``, ``quantize``, ``export``, ``deploy``,
   ``decompose`` and every other subpackage or top-level module) nor between its modules.
   Only imports that run when a module is imported count: an import inside a function is lazy,
   one under ``if TYPE_CHECKING:`` never runs.
2. No module imports another package's private names (``from slimkit.x.y import _name``,
   ``import slimkit.x._mod``, ``from slimkit.x import _mod``), lazy or not; benchmarks and
   tests import no private name of slimkit at all (their own helpers, ``tests/_user_files.py``,
   are theirs to import).

What still breaks a rule is listed in ``KNOWN_*``; a test checks every listed entry still
exists, so the lists can only shrink.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "slimkit"
#: the packages the "one contract" issue names; the cycle test covers every unit, these by name too
NAMED_PACKAGES = ("encode", "quantize", "export", "deploy", "decompose")

#: ``path: module.name`` of private imports across packages that other work is removing.
KNOWN_PRIVATE_IMPORTS: set[str] = set()
#: package-level import cycles (as sorted tuples of the units in one strongly connected component)
KNOWN_PACKAGE_CYCLES: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from m import a, b``, the names) at ``path:line``."""

    path: Path
    line: int
    module: str
    names: tuple[str, ...]
    #: runs when the importing module is imported (module or class level, not under TYPE_CHECKING)
    eager: bool


def module_name(path: Path) -> str:
    """``src/slimkit/prune/masks.py`` -> ``slimkit.prune.masks``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` (``slimkit.x.y``) is a module or package under src/."""
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def unit(name: str) -> str:
    """The package a slimkit module belongs to: ``slimkit.prune.graph.rules`` -> ``prune``;
    a top-level module is its own unit (``slimkit.pipeline`` -> ``pipeline``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "slimkit"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.cache
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(path: Path, module: str | None = None) -> list[Import]:
    """Every import statement in ``path``; relative imports resolved against ``module``."""
    tree = _parse(path, path.stat().st_mtime_ns)
    package = module if path.name == "__init__.py" else (module or "").rpartition(".")[0]
    found: list[Import] = []

    def visit(nodes: list[ast.stmt], eager: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, False)
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.body, False)
                visit(node.orelse, eager)
                continue
            if isinstance(node, ast.Import):
                found.extend(Import(path, node.lineno, alias.name, (), eager) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                found.append(Import(path, node.lineno, target, tuple(a.name for a in node.names), eager))
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                visit(getattr(node, field, None) or [], eager)

    visit(tree.body, True)
    return found


def src_imports() -> Iterator[tuple[str, Import]]:
    """(importing module, import) for every import of a slimkit module in src/."""
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for imp in imports_of(path, name):
            if imp.module.split(".")[0] == "slimkit":
                yield name, imp


def imported_modules(imp: Import) -> list[str]:
    """The modules an import loads: ``from slimkit import manifest`` loads ``slimkit.manifest``."""
    if not imp.names:
        return [imp.module]
    return [f"{imp.module}.{n}" if is_module(f"{imp.module}.{n}") else imp.module for n in imp.names]


def eager_graph(by: str) -> dict[str, dict[str, list[str]]]:
    """``{from: {to: ['module:line', ...]}}`` of the imports that run at import time, by ``unit`` or ``module``."""
    graph: dict[str, dict[str, list[str]]] = {}
    for name, imp in src_imports():
        if not imp.eager:
            continue
        for target in imported_modules(imp):
            a, b = (unit(name), unit(target)) if by == "unit" else (name, target)
            if a != b:
                graph.setdefault(a, {}).setdefault(b, []).append(f"{name}:{imp.line}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one node (Tarjan 1972), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return sorted(found)


def describe(component: tuple[str, ...], graph: dict[str, dict[str, list[str]]]) -> str:
    """The edges inside a cycle with the first import that makes each."""
    edges = [f"{a} -> {b} ({graph[a][b][0]})" for a in component for b in graph.get(a, {}) if b in component]
    return "; ".join(edges)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, importer: str | None) -> list[str]:
    """``module.name`` of each private slimkit name or module that ``path`` imports from another unit.

    ``importer`` is the importing module for a file in src/ (same-unit private imports are
    allowed there); None for benchmarks and tests (no private slimkit name is theirs).
    """
    offences = []
    for imp in imports_of(path, importer):
        if imp.module.split(".")[0] != "slimkit":
            continue
        if importer is not None and unit(importer) == unit(imp.module):
            continue
        parts = imp.module.split(".")
        for depth, part in enumerate(parts):
            if _private(part):
                offences.append(".".join(parts[:depth + 1]))
                break
        else:
            offences.extend(f"{imp.module}.{n}" for n in imp.names if _private(n))
    return offences


def all_private_imports() -> set[str]:
    found = set()
    """``path: module.name`` of every private import across units in src/, benchmarks/ and tests/."""
    found = set()
    files = [(path, module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]
    files += [(path, None) for folder in ("benchmarks", "tests") for path in sorted((ROOT / folder).rglob("*.py"))]
    for path, importer in files:
        rel = path.relative_to(ROOT).as_posix()
        found.update(f"{rel}: {name}" for name in private_imports(path, importer))
    return found


# --------------------------------------------------------------------------- the analysis itself


def test_the_import_reader_sees_lazy_type_checking_relative_and_multiline_imports(tmp_path):
    """The reader is what the rules stand on: each kind of import statement it must tell apart."""
    pkg = tmp_path / "src" / "slimkit" / "fake"
    pkg.mkdir(parents=True)
    source = pkg / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import slimkit.quantize._hidden\n"
        "from slimkit.prune.structured import (\n"
        "    public_name,\n"
        "    _solve_ratio,\n"
        ")\n"
        "from . import sibling\n"
        "from ..encode import container\n"
        "if TYPE_CHECKING:\n"
        "    from slimkit.deploy import Thing\n"
        "try:\n"
        "    import slimkit.export\n"
        "except ImportError:\n"
        "    pass\n"
        "class A:\n"
        "    from slimkit.measure import macs\n"
        "def later():\n"
        "    from slimkit.models import _zoo\n"
    )
    found = {(i.module, i.names): i.eager for i in imports_of(source, "slimkit.fake.mod")}
    assert found == {
        ("typing", ("TYPE_CHECKING",)): True,
        ("slimkit.quantize._hidden", ()): True,
        ("slimkit.prune.structured", ("public_name", "_solve_ratio")): True,
        ("slimkit.fake", ("sibling",)): True,
        ("slimkit.encode", ("container",)): True,
        ("slimkit.deploy", ("Thing",)): False,
        ("slimkit.export", ()): True,
        ("slimkit.measure", ("macs",)): True,
        ("slimkit.models", ("_zoo",)): False,
    }
    offences = set(private_imports(source, "slimkit.fake.mod"))
    assert offences == {"slimkit.quantize._hidden", "slimkit.prune.structured._solve_ratio", "slimkit.models._zoo"}
    # the same file outside src/ (a test or benchmark): the same three, since no private name is theirs
    assert set(private_imports(source, None)) == offences


# --------------------------------------------------------------------------- the rules


def test_no_import_cycle_between_packages():
    graph = eager_graph("unit")
    assert set(NAMED_PACKAGES) <= set(graph), "a named package is missing from the import graph"
    new = [c for c in cycles(graph) if c not in KNOWN_PACKAGE_CYCLES]
    assert not new, "import cycle between packages: " + " | ".join(describe(c, graph) for c in new)


def test_no_import_cycle_between_the_named_packages():
    """encode, quantize, export, deploy, decompose: not even through other packages (no allowance)."""
    graph = eager_graph("unit")
    for component in cycles(graph):
        named = sorted(set(component) & set(NAMED_PACKAGES))
        assert len(named) < 2, f"{' and '.join(named)} import each other: {describe(component, graph)}"


def test_no_import_cycle_between_modules():
    graph = eager_graph("module")
    found = cycles(graph)
    assert not found, "import cycle between modules: " + " | ".join(describe(c, graph) for c in found)


def test_known_package_cycles_still_exist():
    current = set(cycles(eager_graph("unit")))
    stale = KNOWN_PACKAGE_CYCLES - current
    assert not stale, f"these cycles are gone: remove them from KNOWN_PACKAGE_CYCLES: {sorted(stale)}"


def test_no_private_imports_across_packages():
    new = sorted(all_private_imports() - KNOWN_PRIVATE_IMPORTS)
    assert not new, ("private names imported from another package (make them public or move the code): "
                     + ", ".join(new))


def test_known_private_imports_still_exist():
    stale = sorted(KNOWN_PRIVATE_IMPORTS - all_private_imports())
    assert not stale, f"fixed: remove these from KNOWN_PRIVATE_IMPORTS: {', '.join(stale)}"


@pytest.mark.parametrize("package", NAMED_PACKAGES)
def test_named_package_exists(package):
    assert is_module(f"slimkit.{package}"), f"slimkit.{package} is named by the import rules but does not exist"
