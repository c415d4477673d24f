"""The architecture stays one-way (DESIGN §2): package layering, no import cycles, torch-free streaming,
the runtime never importing training, and files under the size budget. Read from the source with `ast`,
lazy (function-level) imports included: an import inside a function is still a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "streaming", "avatar", "audio", "models", "training", "benchmarks")
RUNTIME = ("app", "streaming", "avatar", "audio", "models")
# What each package may import from the project (besides itself): `app -> streaming -> avatar -> {audio, models}`,
# training and benchmarks on top, never imported by the runtime.
ALLOWED = {
    "models": set(),
    "audio": set(),
    "avatar": {"audio", "models"},
    "streaming": {"avatar", "audio"},
    "app": {"streaming", "avatar", "audio", "models"},
    "training": {"app", "streaming", "avatar", "audio", "models"},
    "benchmarks": {"app", "streaming", "avatar", "audio", "models"},
}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (resolved to the longest known module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations only: they never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_downwards(graph):
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_runtime_never_imports_training(graph):
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.split(".")[0] in RUNTIME
                   for b in deps if b.split(".")[0] in ("training", "benchmarks"))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_files(graph):
    assert _cycles(graph) == []


def test_no_import_cycles_between_packages(graph):
    packages: dict[str, set[str]] = {}
    for a, deps in graph.items():
        top = a.split(".")[0]
        packages.setdefault(top, set()).update(b.split(".")[0] for b in deps if b.split(".")[0] != top)
    assert _cycles(packages) == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_streaming_stays_torch_free():
    modules = sorted(m for m in _sources() if m.split(".")[0] == "streaming")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not bad, bad[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_files_stay_under_the_size_budget():
    files = [p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py")]
    over = sorted(f"{p.relative_to(ROOT)}: {n}" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not over, over
