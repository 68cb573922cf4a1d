"""Import hygiene of our packages, read from the source with `ast` (nothing is imported):

1. No import cycles. Every import counts as an edge, top-level or inside a function: a
   function-local import only postpones a cycle to the first call. `from a import b` is an edge to
   the module `a.b` when `b` is a submodule, else to `a`.
2. No private cross-imports: a module does not reach for another module's `_name`, neither with
   `from a.b import _name` nor with `a.b._name` on an imported module. Make the name public, or
   move it to where both use it.

tests/ and benchmarks/ are outside both checks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cls", "mls", "engine", "proto", "daemon")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)
    """Imported module of ours -> the first line that imports it."""
    private: list[tuple[int, str]] = field(default_factory=list)
    """(line, what) for every private name taken from another module of ours."""


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _load() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name, is_package = _module_name(path)
            modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return modules


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if not module.is_package:
        package = package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _scan(module: Module, modules: dict[str, Module]) -> None:
    def edge(target: str, line: int) -> None:
        if target != module.name:
            module.imports.setdefault(target, line)

    aliases: dict[str, str] = {}  # a local name bound to one of our modules -> that module
    roots: set[str] = set()  # names bound by `import a.b` (a), so `a.b._x` is a module access
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    edge(a.name, node.lineno)
                    aliases[a.asname or a.name] = a.name
                    if a.asname is None:
                        roots.add(a.name.split(".")[0])
                if any(_private(part) for part in a.name.split(".")[1:]) and \
                        a.name.split(".")[0] in PACKAGES and a.name.rpartition(".")[0] != module.name:
                    module.private.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    edge(sub, node.lineno)
                    aliases[a.asname or a.name] = sub
                elif base in modules:
                    edge(base, node.lineno)
                else:
                    continue
                if _private(a.name) and base != module.name:
                    module.private.append((node.lineno, f"from {base} import {a.name}"))
    for node in ast.walk(module.tree):  # `mod._name` on an imported module of ours
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            target = aliases.get(dotted) if dotted else None
            if target is None and dotted in modules and dotted.split(".")[0] in roots:
                target = dotted  # (a bare `cls` is a classmethod's class, not our package)
            if target is not None and target != module.name:
                module.private.append((node.lineno, f"{dotted}.{node.attr} (module {target})"))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _graph() -> dict[str, Module]:
    modules = _load()
    for m in modules.values():
        _scan(m, modules)
    return modules


def _cycles(modules: dict[str, Module]) -> Iterator[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of our modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].imports:
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
                components.append(component)

    for v in sorted(modules):
        if v not in index:
            visit(v)
    for component in components:
        yield _one_cycle(sorted(component), modules)


def _one_cycle(component: list[str], modules: dict[str, Module]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    inside, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in modules[v].imports:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w in inside and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def _describe(cycle: list[str], modules: dict[str, Module]) -> str:
    steps = [f"{a} (line {modules[a].imports[b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "import cycle: " + " ; ".join(steps)


def test_the_graph_sees_our_packages():
    modules = _graph()
    assert {"cls.clsd", "mls.mlsd", "engine.engine", "proto.clsd_pb2", "daemon.notify"} <= set(modules)
    assert "cls.service" in modules["cls.clsd"].imports
    assert "cls.http.server" in modules["cls.clsd"].imports  # a function-local import is an edge


def test_no_import_cycles():
    modules = _graph()
    cycles = [_describe(c, modules) for c in _cycles(modules)]
    assert not cycles, "\n".join(cycles)


def test_no_private_cross_imports():
    modules = _graph()
    found = [f"{m.path.relative_to(ROOT)}:{line}: {what}"
             for m in modules.values() for line, what in m.private]
    assert not found, "private names of another module:\n" + "\n".join(sorted(found))


def test_the_checks_find_what_they_look_for(tmp_path):
    """The checks on a tiny made-up graph: a cycle through a function-local import, and both
    kinds of private cross-import."""
    a = Module("pkg.a", tmp_path / "a.py", False, ast.parse(
        "from pkg import b\n\ndef f():\n    from pkg.b import _helper\n    return b._x\n"))
    b = Module("pkg.b", tmp_path / "b.py", False, ast.parse(
        "def g():\n    import pkg.c\n    return pkg.c._y\n"))
    c = Module("pkg.c", tmp_path / "c.py", False, ast.parse(
        "from . import a\n\nclass K:\n    @classmethod\n    def h(pkg):\n        return pkg._z\n"))
    pkg = Module("pkg", tmp_path / "__init__.py", True, ast.parse(""))
    modules = {m.name: m for m in (a, b, c, pkg)}
    for m in modules.values():
        _scan(m, modules)
    assert list(_cycles(modules)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert [what for _, what in a.private] == ["from pkg.b import _helper", "b._x (module pkg.b)"]
    # `pkg.c._y` after `import pkg.c` is a module's private name; a parameter that happens to be
    # called like a package (`pkg._z`, as `cls._x` in a classmethod) is not.
    assert [what for _, what in b.private] == ["pkg.c._y (module pkg.c)"]
    assert c.private == []
