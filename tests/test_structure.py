"""The source's shape: no function past 80 lines, no class past 300, and no import circle in logitstore/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300


def oversized(folder: str) -> list[str]:
    """'path:line kind name (N lines)' for every function over 80 lines and class over 300 under `folder`."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit, what = MAX_FUNCTION_LINES, "function"
            elif isinstance(node, ast.ClassDef):
                limit, what = MAX_CLASS_LINES, "class"
            else:
                continue
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {what} {node.name} ({lines} lines)")
    return found


def package_modules(folder: str, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package kept in `folder`."""
    modules = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
        modules[".".join([package, *parts])] = path
    return modules


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, at module level or inside functions alike. `from .x
    import y` imports x.y where x.y is a module, else x; importing a package's submodule does not count as
    importing the package."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package[:len(package) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges[name].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (Tarjan's strongly connected
    components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                group.append(other)
                if other == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_long_function_or_class_in_the_store_core():
    assert oversized("logitstore") == []


@pytest.mark.xfail(reason="dpo/ and cli/ are being rearranged; the limit holds there once that is done",
                   strict=False)
@pytest.mark.parametrize("folder", ["dpo", "cli"])
def test_no_long_function_or_class_in_dpo_and_cli(folder):
    assert oversized(folder) == []


def test_no_import_circle_in_the_store_core():
    assert circles(imports(package_modules("logitstore", "logitstore"))) == []


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """A long function, a long class and a circle, written here, are each found."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("from . import b\n\n\ndef f():\n" + "    x = 1\n" * 80 + "\n\nclass C:\n"
                                 + "    y = 1\n" * 300)
    (folder / "b.py").write_text("def g():\n    from .c import h\n")
    (folder / "c.py").write_text("from .a import f\n\n\ndef h():\n    pass\n")
    (folder / "d.py").write_text("from pkg import a\n")
    (folder / "e.py").write_text("def at_the_limit():\n" + "    x = 1\n" * 79 + "\n\nclass AtTheLimit:\n"
                                 + "    y = 1\n" * 299)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert oversized("pkg") == ["pkg/a.py:4 function f (81 lines)", "pkg/a.py:87 class C (301 lines)"]
    edges = imports(package_modules("pkg", "pkg"))
    assert edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"},
                     "pkg.e": set()}
    assert circles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]
