"""The house plan, checked: which parts of fedtune may import which (README, "Layout").

A newcomer should be able to trust the folder names: ``clients/`` is what runs on a contributor and never
pulls in the coordinator, the credit ledger or the CLI; nothing imports the CLI; lower layers never import
higher ones; there are no import cycles. Imports are read from the source (module level and inside
functions alike), so a lazy import cannot hide a tangle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO

PACKAGE_DIRS = {
    "fedtune": REPO / "fedtune",
    "fedtune.clients": REPO / "clients",
    "fedtune.server": REPO / "server",
    "fedtune.strategies": REPO / "strategies",
}

LAYERS: list[set[str]] = [
    {"fedtune", "fedtune.files", "fedtune.identity", "fedtune.console"},
    {"fedtune.config"},
    {"fedtune.rundir"},
    {"fedtune.ml"},
    {"fedtune.privacy", "fedtune.secagg", "fedtune.wire", "fedtune.deploy"},
    {"fedtune.preflight"},
    {"fedtune.credit", "fedtune.clients", "fedtune.strategies"},
    {"fedtune.server"},
    {"fedtune.research"},
    {"fedtune.cli"},
]
"""Each part may import parts of lower layers and itself, nothing else (a part is a sub-package or a
top-level module of ``fedtune``)."""

CONTRIBUTOR_FORBIDDEN = ("fedtune.server", "fedtune.credit", "fedtune.cli", "fedtune.strategies")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(
                name.startswith(other + ".") or name == other
                for other in PACKAGE_DIRS
                if other != package and other.startswith(package + ".")
            ):
                continue  # fedtune/… never holds clients/server/strategies, but be safe
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """fedtune modules imported anywhere in ``path`` (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def part_of(module: str) -> str:
    """The most specific part of LAYERS that holds ``module``."""
    parts = [p for layer in LAYERS for p in layer if p != "fedtune" and (module == p or module.startswith(p + "."))]
    if module == "fedtune":
        return "fedtune"
    assert parts, f"{module} is in no layer of LAYERS: add it"
    return max(parts, key=len)


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: set(imports_of(name, path, set(mods))) for name, path in mods.items()}


def test_every_module_is_in_a_layer_and_imports_only_downwards() -> None:
    bad = []
    for module, targets in graph().items():
        mine = part_of(module)
        for target in targets:
            theirs = part_of(target)
            if theirs != mine and layer_of(theirs) >= layer_of(mine):
                bad.append(f"{module} imports {target} ({theirs} is not below {mine})")
    assert not bad, "\n".join(sorted(bad))


def test_contributor_code_never_imports_coordinator_credit_or_cli() -> None:
    bad = [
        f"{m} imports {t}"
        for m, targets in graph().items()
        if part_of(m) == "fedtune.clients"
        for t in targets
        if part_of(t) in CONTRIBUTOR_FORBIDDEN
    ]
    assert not bad, bad


def test_no_import_cycles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    # a package's __init__ importing its own sub-modules, which import the package, is not a tangle
    cycles = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not cycles, cycles


@pytest.mark.slow
def test_a_contributor_process_does_not_load_the_ledger() -> None:
    """``fedtune join`` and the ClientApp it runs: no SQLAlchemy, no Alembic (seconds per process)."""
    code = (
        "import sys\n"
        "from fedtune.cli import build_parser\n"
        "build_parser().parse_args(['join', '--coordinator', '127.0.0.1:1'])\n"
        "import fedtune.clients.app, fedtune.clients.join, fedtune.clients.secagg_client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_version_is_exposed() -> None:
    import fedtune

    assert fedtune.__version__ and fedtune.__version__ != "0+unknown"
