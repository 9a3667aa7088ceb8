"""Static layout metrics of the robustft package, read with ``ast`` (nothing is imported or run).

Module count, import cycles (strongly connected components of the module import graph, the lazy package
``__init__`` edges left out), the depth of that graph (longest chain of imports), the largest file in lines
and the longest function in lines: the figures a re-layout or a split is meant to move (issue 23).

    python benchmarks/layout.py                       # this checkout
    python benchmarks/layout.py --compare /work/main  # also another checkout (before/after)
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(tree: Path) -> dict[str, Path]:
    """Dotted module name -> file of every module of ``tree/robustft`` (packages by their ``__init__``)."""
    out = {}
    for path in sorted((tree / "robustft").rglob("*.py")):
        parts = path.relative_to(tree).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (top level and inside functions alike)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            out.update(c for c in [target, *(f"{target}.{a.name}" for a in node.names)] if c in known)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    out.discard(module)
    return out


def longest_function(module: str, tree: ast.AST) -> tuple[int, str]:
    """(lines, dotted name) of the longest function or method of one module."""
    best = (0, "")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            best = max(best, (node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def depth(graph: dict[str, set[str]]) -> int:
    """Modules on the longest simple import chain (the graph is expected to be acyclic; cycles are cut)."""
    memo: dict[str, int] = {}

    def walk(v: str, seen: frozenset[str]) -> int:
        if v in memo:
            return memo[v]
        d = 1 + max((walk(w, seen | {v}) for w in graph[v] if w not in seen), default=0)
        memo[v] = d
        return d

    return max((walk(v, frozenset()) for v in graph), default=0)


def metrics(tree: Path) -> dict[str, object]:
    """The layout figures of the checkout at ``tree``."""
    mods = modules(tree)
    parsed = {m: ast.parse(p.read_text()) for m, p in mods.items()}
    graph = {m: imports(m, mods[m], parsed[m], set(mods)) for m in mods}
    eager = {m: {t for t in ts if mods[t].name != "__init__.py"} for m, ts in graph.items()}
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    largest = max(lines, key=lambda m: (lines[m], m))
    n, name = max(longest_function(m, parsed[m]) for m in mods)
    return {
        "modules": len(mods),
        "import cycles": cycles(eager),
        "import graph depth": depth(eager),
        "largest file": f"{largest} ({lines[largest]} lines)",
        "longest function": f"{name} ({n} lines)",
    }


def table(results: dict[str, dict[str, object]]) -> str:
    """A markdown table, one column per checkout."""
    names = list(results)
    rows = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in next(iter(results.values())):
        rows.append(f"| {key} | " + " | ".join(str(results[n][key]) for n in names) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to measure as well")
    args = parser.parse_args(argv)
    results = {"this checkout": metrics(ROOT)}
    if args.compare is not None:
        results[str(args.compare)] = metrics(args.compare.resolve())
    print(table(results))


if __name__ == "__main__":
    main()
