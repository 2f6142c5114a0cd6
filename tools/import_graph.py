"""Print dqtool's import graph: every project module, the project modules it imports, and its floor.

    python tools/import_graph.py            # modules by floor, with their imports
    python tools/import_graph.py --check    # exit 1 on a cycle, an import against the layers, or > 8 floors

Read from the source with ``ast`` (nothing is imported). Every import statement counts, at module level
or inside a function. A package's lazy re-exports (``lazy_loader.attach_stub`` over its ``__init__.pyi``) count as imports of
its submodules.
Floor 0 imports no project module; a module's floor is one more than the highest floor it imports.
Layers: ``dqtool_cli`` -> ``dqtool`` -> ``dqtool_kernels``, never the other way.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dqtool": ROOT / "src" / "dqtool", "dqtool_kernels": ROOT / "kernels", "dqtool_cli": ROOT / "cli"}
LAYER = {"dqtool_cli": 2, "dqtool": 1, "dqtool_kernels": 0}
MAX_FLOORS = 8


def modules() -> dict[str, Path]:
    found = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([top, *parts])] = path
    return found


def _resolve(name: str, known: dict) -> str | None:
    """The longest known module that ``name`` is or lies inside."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    base = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                stem = ".".join(anchor + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "attach_stub"):
            stub = ast.parse(path.with_suffix(".pyi").read_text())
            names = [f"{module}.{n.module}" for n in stub.body if isinstance(n, ast.ImportFrom) and n.level == 1]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def floors(g: dict[str, set[str]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def floor(m):
        if m not in memo:
            memo[m] = -1  # cycle guard; cycles are reported separately
            memo[m] = 1 + max((floor(d) for d in g[m]), default=-1)
        return memo[m]

    return {m: floor(m) for m in g}


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {d}" for m, deps in g.items() for d in deps
            if LAYER[m.split(".")[0]] < LAYER[d.split(".")[0]]]


def main(argv: list[str]) -> int:
    g = graph()
    found_cycles = cycles(g)
    fl = floors(g) if not found_cycles else {m: 0 for m in g}
    for level in range(max(fl.values()) + 1):
        print(f"floor {level}")
        for m in sorted(k for k, v in fl.items() if v == level):
            print(f"  {m:40s} <- {', '.join(sorted(g[m])) or '-'}")
    n_floors = max(fl.values()) + 1
    bad = layer_violations(g)
    print(f"\n{len(g)} modules, {sum(map(len, g.values()))} imports, {n_floors} floors, "
          f"{len(found_cycles)} cycles, {len(bad)} imports against the layers")
    for c in found_cycles:
        print("cycle:", " <-> ".join(c))
    for b in bad:
        print("against the layers:", b)
    if "--check" in argv and (found_cycles or bad or n_floors > MAX_FLOORS):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
