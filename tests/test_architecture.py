"""The package's shape: no import circle, no stage importing the command layer, modules of readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "collide"
COMMAND_LAYER = ("collide.cli", "collide.commands")
ENTRY_POINTS = ("__main__",)  # `python -m collide.<x>` shims: executed, never imported
MAX_LINES = 450  # "about 400": a module a reader holds in their head


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: collide modules it imports anywhere in its body (module level or inside functions)}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collide"):
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("collide")}
        graph[name] = deps - {name, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_no_stage_imports_the_command_layer():
    upward = [(m, d) for m, deps in import_graph().items() for d in deps
              if d.startswith(COMMAND_LAYER) and not m.startswith(COMMAND_LAYER) and not m.endswith(ENTRY_POINTS)]
    assert upward == []


def test_every_command_is_registered_as_a_function_with_its_schema():
    from dataclasses import is_dataclass

    from collide import cli

    commands = {p.stem.replace("_", "-") for p in (PACKAGE / "commands").glob("*.py") if p.stem != "__init__"}
    assert set(cli.COMMANDS) >= commands
    for name, command in cli.COMMANDS.items():
        assert callable(command.fn) and is_dataclass(command.schema), name
        assert (PACKAGE / "conf" / f"{name}.yaml").is_file(), name


def test_modules_stay_readable():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_command_line_starts_without_torch():
    """`collide --help` and every one-line error come before any heavy import: stages load lazily."""
    import subprocess
    import sys

    code = "import sys, collide.cli; sys.exit(sorted({'torch', 'transformers', 'pyarrow'} & set(sys.modules)) or 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
