"""The source's shape: no function past 80 lines, no class past 300, no import circle anywhere in logitstore/,
dpo/ and cli/, and dpo/'s layers importing only the layers below them."""

from __future__ import annotations

import ast
import re
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


@pytest.mark.parametrize("folder", ["logitstore", "dpo", "cli"])
def test_no_long_function_or_class(folder):
    assert oversized(folder) == []


def project_modules() -> dict[str, Path]:
    """Every module of the installed package: logitstore/, with dpo/ as logitstore.dpo and cli/ as logitstore.cli."""
    return {**package_modules("logitstore", "logitstore"), **package_modules("dpo", "logitstore.dpo"),
            **package_modules("cli", "logitstore.cli")}


def test_no_import_circle():
    assert circles(imports(project_modules())) == []


# dpo/'s layers, bottom first: a module imports modules of its own layer or of layers below it only.
LAYERS = [("config", "choices"), ("inputs",), ("objectives",), ("model",), ("distributed",), ("kinds",),
          ("reference", "training"), ("demo",)]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["logitstore", "dpo"] or len(parts) < 3:
        return None
    return next(i for i, names in enumerate(LAYERS) if parts[2] in names or parts[2] == "data")


def test_dpo_layers_import_only_below():
    edges = imports(project_modules())
    upward = [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a])
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]
    assert upward == []
    # The store core (but its integrations, which bring stores to other trainers) imports nothing of dpo/ or cli/.
    core = [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a])
            if not a.startswith(("logitstore.dpo", "logitstore.cli", "logitstore.integrations"))
            and b.startswith(("logitstore.dpo", "logitstore.cli"))]
    assert core == []


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


# A store kind's name or identity compared: `store.kind.name == "unpaired"`, `kind is kinds.COMPLETION`,
# `kind.fields is store.kind`, `.name != "pairs"`.
KIND_COMPARISON = re.compile(r"\.kind\.name\s*(==|!=)|(==|!=|\bis\b(\s+not)?)\s*[\w.]*kinds\.(PAIRS|UNPAIRED|COMPLETION)\b"
                             r"|\bis\b(\s+not)?\s*[\w.]*store\.kind\b|\.name\s*(==|!=)\s*[\"'](pairs|unpaired|completion)[\"']")


def kind_comparisons() -> list[str]:
    """'path:line' of every line of dpo/ and cli/ that compares a store kind's name or identity."""
    found = []
    for folder in ("dpo", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#", 1)[0]
                if KIND_COMPARISON.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_the_kind_is_decided_in_one_place():
    """The reference pass, the training loop and the CLI take a kind's module from the registry and never ask which
    kind they hold: the registry's lookup is the one comparison."""
    found = kind_comparisons()
    assert len({f.split(":")[0] for f in found}) <= 1 and len(found) <= 4, found
    assert found and all(f.startswith("dpo/kinds/__init__.py:") for f in found), found
