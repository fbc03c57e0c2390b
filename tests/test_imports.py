"""Imports go one way: scripts/ -> tasks/ (the synthetic world tasks/world/ included) -> nanopipe/, never back up,
and no modules import each other in a loop (imports inside functions count)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"nanopipe": 0, "tasks": 1, "scripts": 2}   # a module imports its own layer or lower ones


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layered packages under `root`."""
    found = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (`from a import b` counts a.b when b is a module, else a)."""
    files = module_files(root)

    def project_module(name):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(t for t in map(project_module, names) if t and t != module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(root: Path) -> list[str]:
    graph = import_graph(root)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]:
                out.append(f"upward import: {module} -> {target}")
    return out


def test_the_tree_imports_one_way():
    graph = import_graph(ROOT)
    assert {"nanopipe.shards", "tasks.world.facts", "tasks.profile", "scripts.dataset"} <= set(graph)
    assert problems(ROOT) == []


def write_tree(root: Path, files: dict[str, str]):
    for package in LAYERS:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_finds_the_cycle_and_the_upward_imports_of_the_old_layout(tmp_path):
    """The imports as they were before the world moved out of the library (a function-level import included)."""
    write_tree(tmp_path, {
        "nanopipe/dataset.py": "def build_synthetic():\n    from nanopipe import synthetic\n",
        "nanopipe/synthetic.py": "from tasks.common import mc_conversation\nfrom tasks.spelling import pick_letter\n",
        "tasks/common.py": "from nanopipe.dataset import chat_data_file\n",
        "tasks/spelling.py": "from tasks.common import Task\n",
        "scripts/base_eval.py": "from nanopipe import cli, synthetic\n",
    })
    assert problems(tmp_path) == [
        "import cycle: nanopipe.dataset <-> nanopipe.synthetic <-> tasks.common <-> tasks.spelling",
        "upward import: nanopipe.synthetic -> tasks.common",
        "upward import: nanopipe.synthetic -> tasks.spelling",
    ]


def test_relative_imports_and_cycles_within_a_layer_count(tmp_path):
    write_tree(tmp_path, {
        "tasks/world/__init__.py": "",
        "tasks/world/a.py": "from .b import x\n",
        "tasks/world/b.py": "from . import a\nimport scripts.dataset\n",
        "scripts/dataset.py": "from tasks.world import a\n",
    })
    assert problems(tmp_path) == ["import cycle: scripts.dataset <-> tasks.world.a <-> tasks.world.b",
                                  "upward import: tasks.world.b -> scripts.dataset"]

