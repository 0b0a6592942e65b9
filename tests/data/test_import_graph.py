"""The layout of `nemo_avllm/data/`: imports run one way and no private name crosses a file.

Reads every `import` / `from ... import` of `nemo_avllm/data/*.py` with `ast` (at module level
and inside functions: a function-level import that hides a cycle is still a cycle), builds the
graph of data modules importing data modules, and fails on any cycle; and fails on any `_private`
name of a data module imported by another file of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "nemo_avllm"
DATA = PKG / "data"
PACKAGE = "nemo_avllm.data"


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATA.glob("*.py")) if p.stem != "__init__"}


def import_edges() -> tuple[dict[str, set[str]], list[str]]:
    """(data module -> data modules it imports, "file:line: module._name" offences anywhere in
    the package)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        name = path.stem if path.parent == DATA else str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[tuple[str, list[str]]] = []  # (imported data module, names taken from it)
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PACKAGE + "."):
                        targets.append((a.name.split(".")[2], []))
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level and path.parent == DATA:  # `from .x import y` / `from . import x`
                    module = f"{PACKAGE}.{module}" if module else PACKAGE
                if module == PACKAGE:  # `from nemo_avllm.data import media`
                    targets += [(a.name, []) for a in node.names]
                elif module.startswith(PACKAGE + "."):
                    targets.append((module.split(".")[2], [a.name for a in node.names]))
            for target, names in targets:
                if target in mods and target != name:
                    if name in graph:
                        graph[name].add(target)
                    rel = path.relative_to(PKG.parent)
                    private += [f"{rel}:{node.lineno}: {target}.{n}" for n in names if n.startswith("_")]
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    src = "def f():\n    from nemo_avllm.data.x import _hidden\n"
    found = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].names[0].name == "_hidden"


def test_data_imports_have_no_cycle():
    graph, _ = import_edges()
    assert graph["dataset"] and graph["features"], "the parser found no imports: check DATA"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in nemo_avllm/data: {' -> '.join(cycle)}"


def test_no_private_name_crosses_a_file():
    _, private = import_edges()
    assert not private, "private names imported from another file:\n" + "\n".join(private)
