"""The package's imports, read statically from the source: no cycles, and kernels never import llmjax.

Every .py under llmjax/ and kernels/ (the package llmjax.kernels) is parsed (nothing is imported), and every
`import` / `from ... import` anywhere in it (module level, inside functions, under `try`, `if` or
`if TYPE_CHECKING`) becomes an edge to the llmjax.* module it names. A function-level import still runs, so a
cycle through one is still a cycle; a typing-only import still says which module knows about which.

How names resolve:
- `import a.b.c` and `from a.b import c` (c a submodule) are edges to a.b.c.
- `from a.b import name` (name not a submodule) is an edge to the module that *defines* name: when a.b is a
  package whose __init__ only re-exports name from one of its submodules, the edge goes to that submodule,
  not to the __init__. So a submodule that imports a sibling's name through its package is not a cycle
  with the __init__ that re-exports it; an __init__ importing its own submodules is an edge like any other.
- Parent packages' __init__ files, which Python also runs on `import a.b.c`, are not edges: an __init__ that
  re-exports its submodules would otherwise put every package in a cycle with its own members.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llmjax": ROOT / "llmjax", "llmjax.kernels": ROOT / "kernels"}  # import name -> folder in the checkout
KERNELS = "llmjax.kernels"


def module_name(package: str, path: Path) -> str:
    """kernels/norms.py -> llmjax.kernels.norms; llmjax/model/__init__.py -> llmjax.model."""
    parts = list(path.relative_to(FOLDERS[package]).with_suffix("").parts)
    return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def package_sources() -> dict[str, Path]:
    """Module name -> source file, for every module of the packages."""
    return {module_name(package, path): path for package, folder in FOLDERS.items()
            for path in sorted(folder.rglob("*.py"))}


def in_kernels(module: str) -> bool:
    return module == KERNELS or module.startswith(KERNELS + ".")


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def absolute_module(node: ast.ImportFrom, importer: str, importer_is_package: bool) -> str:
    """The module a `from X import ...` names, relative imports resolved against the importer."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if importer_is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(tree: ast.AST, importer: str, importer_is_package: bool) -> list[tuple[str, str | None]]:
    """Every import in the tree as (module, name): name None for `import module`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = absolute_module(node, importer, importer_is_package)
            found += [(module, alias.name) for alias in node.names]
    return found


def reexports(tree: ast.AST, package: str) -> dict[str, str]:
    """Names a package __init__ takes from other modules at module level: name -> module it comes from."""
    sources = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = absolute_module(node, package, True)
            for alias in node.names:
                sources[alias.asname or alias.name] = f"{module}.{alias.name}" if alias.name != "*" else module
    return sources


def defining_module(module: str, name: str, sources: dict[str, Path], trees: dict[str, ast.AST]) -> str:
    """The module `from module import name` depends on (see the module docstring)."""
    if f"{module}.{name}" in sources:
        return f"{module}.{name}"
    seen = set()
    while module in sources and is_package(sources[module]) and (module, name) not in seen:
        seen.add((module, name))
        origin = reexports(trees[module], module).get(name)
        if origin is None:
            break
        origin_module, _, origin_name = origin.rpartition(".")
        if origin in sources:
            return origin
        if origin_module not in sources:
            break
        module, name = origin_module, origin_name
    return module


def import_graph() -> dict[str, set[str]]:
    """Module -> the llmjax modules it imports (other packages left out; an unknown llmjax.* name is kept, so a
    stale import still shows)."""
    sources = package_sources()
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in sources.items()}
    graph = {}
    for importer, tree in trees.items():
        edges = set()
        for module, name in imported_names(tree, importer, is_package(sources[importer])):
            if module.split(".")[0] != "llmjax":
                continue
            target = module if name is None else defining_module(module, name, sources, trees)
            if target != importer:
                edges.add(target)
        graph[importer] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, as a -> b -> ... -> a."""
    members, start = set(component), component[0]
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle found in component {component}")


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
    return [" -> ".join(shortest_cycle(graph, component)) for component in strongly_connected(graph)]


def test_graph_sees_function_level_and_reexported_imports():
    """The walker itself: a function-level import is an edge; a name re-exported by a package resolves to the
    submodule that defines it."""
    graph = import_graph()
    assert "llmjax.model" in graph and "llmjax.kernels.norms" in graph
    assert "llmjax.kernels.flash_attention.reference" in graph["llmjax.kernels.flash_attention"]  # relative import
    assert "llmjax.train.state" in graph["llmjax.parallel.plan"]
    cycle_graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert describe_cycles(cycle_graph) == ["a -> b -> c -> a"]
    assert describe_cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_do_not_import_llmjax():
    graph = import_graph()
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() if in_kernels(module)
                   for target in targets if not in_kernels(target))
    assert not wrong, "kernels must import only jax, Pallas, NumPy and kernels/ (llmjax imports kernels):\n" + \
        "\n".join(wrong)


def test_no_import_cycles():
    cycles = describe_cycles(import_graph())
    assert not cycles, "import cycles (move the shared piece down to the lower module):\n" + "\n".join(cycles)
