"""The package's shape is part of its contract: stages in sub-packages, small modules, no
module-level import cycles, and no stage importing the demo that sits on top of them."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "saefe"
MAX_LINES = 500
STAGES = ("ingest", "sae", "labels", "search", "analysis", "serve", "remote")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """saefe modules imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("saefe"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saefe"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return {m for m in found if m in modules}


def test_no_module_over_limit():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_top_level_is_small_and_stages_are_subpackages():
    top = [p.name for p in PKG.glob("*.py")]
    assert len(top) <= 6, top
    for stage in (*STAGES, "demo", "cli"):
        assert (PKG / stage / "__init__.py").exists(), stage


def test_no_module_level_import_cycle():
    modules = _modules()
    graph = {m: _module_level_imports(p, modules) for m, p in modules.items()}
    # importing a.b.c also runs a.b's __init__: count it as an edge
    for m in list(graph):
        parent = m.rpartition(".")[0]
        if parent in graph and parent != "saefe":
            graph[m].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in graph[u]:
            if v == u or (u.startswith(v + ".") and v in graph):  # a package's own children
                continue
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            if v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2

    for m in graph:
        if m not in state:
            dfs(m)


def test_no_stage_imports_the_demo():
    modules = _modules()
    for name, path in modules.items():
        if name.split(".")[1:2] and name.split(".")[1] in STAGES:
            text = path.read_text()
            assert "saefe.demo" not in text, f"{name} imports the demo"


def test_tests_mirror_the_package():
    """Each test module sits in the folder of the stage it tests (tests/<sub-package>/), shared
    builders in tests/fixtures/; only package-wide checks (this file) stay at the top."""
    tests = Path(__file__).resolve().parent
    subpackages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    for p in tests.rglob("test_*.py"):
        rel = p.relative_to(tests)
        assert len(rel.parts) == 2 and rel.parts[0] in subpackages or rel == Path("test_layout.py"), \
            f"tests/{rel} should sit in tests/<stage>/ for one of {sorted(subpackages)}"
