"""The package's layering, read from the source's import statements (no module is imported):
no private name is imported across packages, and no two modules import each other."""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "cutce"


def _modules():
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        out[name] = (path, is_pkg)
    return out


def _package(name, modules):
    return name if modules[name][1] else name.rpartition(".")[0]


def _scan():
    """(edges {(importer, imported): lazy}, private names reached from another package)."""
    modules = _modules()
    edges, private = {}, []
    for name, (path, _) in modules.items():
        tree = ast.parse(path.read_text())
        pkg = _package(name, modules)
        top_level = {id(n) for n in tree.body}
        bound = {}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1])
                base += "." + node.module if node.module else ""
            else:
                base = node.module or ""
            if not base.startswith("cutce"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else base
                if target == sub:
                    bound[alias.asname or alias.name] = sub
                elif alias.name.startswith("_") and _package(base, modules) != pkg:
                    private.append(f"{name}: from {base} import {alias.name}")
                if target != name:
                    lazy = id(node) not in top_level
                    edges[(name, target)] = edges.get((name, target), True) and lazy
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and _package(bound[node.value.id], modules) != pkg):
                private.append(f"{name}: {node.value.id}.{node.attr}")
    return edges, private


def _cycles(edges, with_lazy):
    graph = {}
    for (a, b), lazy in edges.items():
        if with_lazy or not lazy:
            graph.setdefault(a, set()).add(b)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {m: reach(m) for m in graph}
    comps = {frozenset({m} | {o for o in reached[m] if m in reached.get(o, ())})
             for m in graph if m in reached[m]}
    return [set(c) for c in comps]


def test_no_private_name_crosses_a_package():
    _, private = _scan()
    assert private == []


def test_no_import_cycle():
    edges, _ = _scan()
    assert _cycles(edges, with_lazy=False) == []
    # A function-level import hides a cycle from import time, not from the design.
    assert _cycles(edges, with_lazy=True) == []
