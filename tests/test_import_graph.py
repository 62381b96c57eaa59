"""The library's import graph has no cycle, counting every import: module level, inside functions, under
TYPE_CHECKING, and a package's ``importlib.import_module`` of its own submodules (the task registry)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(package_dir: Path) -> dict[str, Path]:
    base = package_dir.parent
    out = {}
    for file in package_dir.rglob("*.py"):
        parts = list(file.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _dynamic_own_submodules(call: ast.Call) -> bool:
    """``importlib.import_module(f"{__name__}.{...}")`` (or ``__package__``): a package loading its submodules."""
    fn = call.func
    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
    if name != "import_module" or not call.args or not isinstance(call.args[0], ast.JoinedStr):
        return False
    first = call.args[0].values[0] if call.args[0].values else None
    return isinstance(first, ast.FormattedValue) and getattr(first.value, "id", "") in ("__name__", "__package__")


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the library modules it imports anywhere in its source."""
    modules = _modules(package_dir)
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    prefix = ".".join(here + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                subs = {f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in modules}
                deps |= subs
                if len(subs) < len(node.names) and prefix in modules:  # names taken from the module itself
                    deps.add(prefix)
            elif isinstance(node, ast.Call) and is_package and _dynamic_own_submodules(node):
                deps |= {m for m in modules if m.rpartition(".")[0] == name}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a -> b -> ... -> a) or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_library_has_no_import_cycle() -> None:
    graph = import_graph(ROOT / "mklvisita")
    assert {"mklvisita.evaluation", "mklvisita.tasks", "mklvisita.tasks.shapes"} <= set(graph)
    assert "mklvisita.tasks" in graph["mklvisita.evaluation"]
    assert "mklvisita.tasks.shapes" in graph["mklvisita.tasks"]  # the registry's dynamic import is counted
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_cycles_hidden_in_functions_and_registries(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation.py").write_text("from .tasks import get_task\n")
    (pkg / "tasks" / "__init__.py").write_text(
        "import importlib\n\ndef get_task(name):\n    return importlib.import_module(f'{__name__}.{name}')\n"
    )
    (pkg / "tasks" / "shapes.py").write_text("def load():\n    from ..evaluation import EvalData\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and {"pkg.evaluation", "pkg.tasks", "pkg.tasks.shapes"} <= set(cycle)
    (pkg / "tasks" / "shapes.py").write_text("def load():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
