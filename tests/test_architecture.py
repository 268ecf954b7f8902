"""The house rules the code must keep (docs/design.md, "Layout"): no import cycle, small
files, no print in library code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "krypton_fx"
MAX_LINES = 520  # "no file over about 500 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """krypton_fx modules that ``path`` imports anywhere (lazy imports inside functions
    count: a lazy import that dodges a cycle is still a cycle), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            # `from pkg import module` imports the module; `from pkg import function` the package
            candidates = names if all(n in known for n in names) else [target] + names
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            # the deepest known module the import names (a.b.c -> a.b if c is a function)
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name and c.startswith("krypton_fx"):
                found.add(c)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first: parents are edges too,
    # except a package's own __init__ importing its children (that is the package itself).
    for name, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in known and not name.startswith(parent + ".") and parent != name:
                    deps.add(parent)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return []


def test_the_package_has_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_count(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from krypton_fx import explainer\n")
    assert _imports(module, "krypton_fx.m", {"krypton_fx", "krypton_fx.explainer"}) == {"krypton_fx.explainer"}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_file_is_too_long(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by job (docs/design.md, Layout)"


def _prints(path: Path) -> list[int]:
    """Lines of print() calls outside a function named main (a command's own output)."""
    tree = ast.parse(path.read_text())
    inside_main = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
                   for n in ast.walk(f)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == "print" and id(n) not in inside_main]


@pytest.mark.parametrize("name", sorted(n for n in _modules() if not n.startswith("krypton_fx.cli")))
def test_library_code_logs_instead_of_printing(name):
    assert not _prints(_modules()[name]), f"{name} prints at lines {_prints(_modules()[name])}: use logging"
