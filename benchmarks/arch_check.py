"""Architecture check: the project's import graph, its layers, and module / function sizes.

Layers run one way: rtdmd (core) <- baselines <- benchmarks <- rtdmd_bench (the console
script). A module imports only modules of its own layer or a lower one, the command-line
modules (``*.cli``) are imported only by command-line modules, no string under rtdmd/
names a module of a higher layer, and project modules import each other without cycles.
Every import counts, function-level ones included (they are found by parsing, not by running).

    python -m benchmarks.arch_check          # one line per violation, then a summary line

prints the layer violations and cycles, and the size guidelines: modules over 500 lines and
functions over 60 lines (tests/test_layers.py asserts the layer rules; the sizes are reported).
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package -> layer (a module may import its own layer and lower ones)
LAYERS = {"rtdmd": 0, "baselines": 1, "benchmarks": 2, "rtdmd_bench": 3}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
_MODULE_STRING = re.compile(r"^(?P<pkg>[a-z_]+)(\.[a-z_0-9]+)*(:[A-Za-z_0-9.]+)?$")


@dataclass(frozen=True)
class ImportSite:
    module: str  # the importing module
    target: str  # the imported project module
    line: int
    in_function: bool


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the layered packages."""
    out = {}
    for pkg in LAYERS:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _function_ranges(tree: ast.AST) -> list[tuple[int, int]]:
    return [(n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node, module: str, is_package: bool, known: dict) -> list[str]:
    """The project modules an import statement imports (the deepest module each name resolves to)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _resolve(node, module, is_package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c.d` where d is an attribute, not a module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return sorted(set(out))


def import_sites(root: Path = ROOT) -> list[ImportSite]:
    """Every import of a project module by a project module, at module or function level."""
    known = project_modules(root)
    sites = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        ranges = _function_ranges(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            inside = any(a <= node.lineno <= b for a, b in ranges)
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    sites.append(ImportSite(module, target, node.lineno, inside))
    return sites


def function_level_imports(root: Path = ROOT) -> list[tuple[str, int]]:
    """(module, line) of every import statement inside a function, of any module (project or not)."""
    out = []
    for module, path in project_modules(root).items():
        tree = ast.parse(path.read_text(), str(path))
        ranges = _function_ranges(tree)
        out += [(module, n.lineno) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and any(a <= n.lineno <= b for a, b in ranges)]
    return sorted(out)


def cycles(sites: list[ImportSite]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for s in sites:
        graph.setdefault(s.module, set()).add(s.target)
        graph.setdefault(s.target, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _is_cli(module: str) -> bool:
    return module.split(".")[-1] == "cli" or module.split(".")[0] == "rtdmd_bench"


def layer_violations(sites: list[ImportSite]) -> list[str]:
    """Imports that go up a layer, and imports of a command-line module from outside the command line."""
    out = []
    for s in sites:
        where = f"{s.module}:{s.line} imports {s.target}"
        if _layer(s.target) > _layer(s.module):
            out.append(f"{where}: up a layer ({s.module.split('.')[0]} is below {s.target.split('.')[0]})")
        elif _is_cli(s.target) and not _is_cli(s.module):
            out.append(f"{where}: only command-line modules import command-line modules")
    return out


def module_strings(root: Path = ROOT, package: str = "rtdmd") -> list[str]:
    """Strings in ``package`` that name a module (or module:attr) of a higher layer, e.g. in a name -> module table."""
    known = project_modules(root)
    out = []
    for module, path in known.items():
        if module.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = _MODULE_STRING.match(node.value)
                if (m and m["pkg"] in LAYERS and LAYERS[m["pkg"]] > LAYERS[package]
                        and node.value.split(":")[0] in known):
                    out.append(f"{module}:{node.lineno} names {node.value!r}, a module of a higher layer")
    return out


def size_violations(root: Path = ROOT) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions over MAX_FUNCTION_LINES lines."""
    out = []
    for module, path in project_modules(root).items():
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(root)}: {n} lines (module over {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines "
                               f"(function over {MAX_FUNCTION_LINES})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.arch_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="project root (default: this checkout)")
    args = p.parse_args(argv)
    sites = import_sites(args.root)
    layers = layer_violations(sites) + module_strings(args.root)
    loops = [" -> ".join(c) for c in cycles(sites)]
    sizes = size_violations(args.root)
    for line in layers:
        print(f"layer: {line}")
    for line in loops:
        print(f"cycle: {line}")
    for line in sizes:
        print(f"size: {line}")
    lazy = function_level_imports(args.root)
    print(f"summary: {len(project_modules(args.root))} modules, {len(layers)} layer violations, {len(loops)} cycles, "
          f"{len(sizes)} size violations, {len(lazy)} function-level imports")
    return 1 if layers or loops else 0


if __name__ == "__main__":
    raise SystemExit(main())
