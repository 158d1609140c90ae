"""The shape the project keeps (checked in CI): a README of at most 200 lines, no class over 200
lines and no function over 60 in src/, no import cycle between esmflash's modules, and tools that
import the installed package instead of editing sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "esmflash"
MAX_README_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 200, 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _sizes(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_readme_is_a_short_user_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_no_class_over_200_lines_and_no_function_over_60():
    too_long = []
    for name, path in _modules().items():
        for node, size in _sizes(ast.parse(path.read_text())):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if size > limit:
                too_long.append(f"{name}.{node.name}: {size} lines (limit {limit})")
    assert not too_long, "\n".join(too_long)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """esmflash modules that `name` imports at module level (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("esmflash"):
                found.add(target)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exports its modules: an edge into a package is an edge into what it
    # imports, so only cycles through plain modules count.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if modules[nxt].name == "__init__.py" and nxt in node:
                continue  # a module importing from its own package's __init__ (a parent)
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_tools_do_not_edit_sys_path():
    offenders = [p.name for p in (REPO / "tools").glob("*.py") if "sys.path.insert" in p.read_text()]
    assert not offenders, f"tools editing sys.path instead of importing the installed package: {offenders}"
