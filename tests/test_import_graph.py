"""The layout of the code: imports run one way and no private name crosses a file.

Reads every module of `nemo_avllm/` and `dali_pipelines/` with `ast`: `import` and `from ...
import` at module level and inside functions (a function-level import that hides a cycle is still
a cycle), relative imports, and `importlib.import_module("literal")` (a module that calls it with a
computed name, `import_module(TABLE[key])`, imports every module its string constants name). Importing `a.b.c` runs the
packages `a` and `a.b` too, so an import also reaches the target's enclosing packages (those that
do not enclose the importer: they are running already). Fails on any cycle between modules, on any
cycle between the subpackages (each top-level module counts as its own part), and on any `_private`
name of one file imported or used by another."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nemo_avllm", "dali_pipelines")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods) -> str | None:
    """The longest prefix of dotted `name` that is one of our modules."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in mods:
            return ".".join(parts)
        parts.pop()
    return None


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from` import names (relative ones resolved against the file)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _is_import_module(call: ast.Call) -> bool:
    return getattr(call.func, "attr", None) == "import_module" or getattr(call.func, "id", None) == "import_module"


def _literal(call: ast.Call) -> bool:
    return bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def _imports(module: str, path: Path, mods) -> list[tuple[str, list[str], int, str | None]]:
    """(imported module, names taken from it, line, local alias of the module) per import."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_import_module(n)]
    if any(not _literal(c) for c in calls):
        # `import_module(TABLE[name])`: a string naming one of our modules is a target
        found += [(n.value, [], n.lineno, None) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in mods]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if target := _resolve(a.name, mods):
                    alias = a.asname if a.asname and target == a.name else None
                    found.append((target, [], node.lineno, alias))
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:  # `from pkg import submodule`
                    found.append((sub, [], node.lineno, a.asname or a.name))
                elif target := _resolve(base, mods):
                    found.append((target, [a.name], node.lineno, None))
        elif isinstance(node, ast.Call) and _is_import_module(node) and _literal(node):
            if target := _resolve(node.args[0].value, mods):
                found.append((target, [], node.lineno, None))
    return found


def _private_attributes(path: Path, aliases: dict[str, str]) -> list[tuple[int, str, str]]:
    """(line, module, name) of each `alias._name` where `alias` is one of our modules imported."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append((node.lineno, aliases[node.value.id], node.attr))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules importing it runs, "file:line: module._name" offences)."""
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for module, path in mods.items():
        rel = path.relative_to(ROOT)
        enclosing = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        aliases = {}
        for target, names, line, alias in _imports(module, path, mods):
            parts = target.split(".")
            reached = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(mods)
            graph[module] |= reached - enclosing - {module}
            if target != module:
                private += [f"{rel}:{line}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
                if alias:
                    aliases[alias] = target
        private += [f"{rel}:{line}: {target}.{n}" for line, target, n in _private_attributes(path, aliases)]
    return graph, private


def part_of(module: str) -> str:
    """The subpackage a module belongs to (`nemo_avllm.data`, `dali_pipelines`, ...); a top-level
    module of nemo_avllm is a part of its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "nemo_avllm" else parts[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
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


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found by removing, one at a time, the closing edge of each cycle found (a report)."""
    graph = {m: set(t) for m, t in graph.items()}
    cycles = []
    while cycle := find_cycle(graph):
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_the_checker_sees_cycles_imports_and_private_names(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    pkg = tmp_path / "nemo_avllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import _hidden\n")
    (pkg / "sub" / "b.py").write_text("import importlib\nimportlib.import_module('nemo_avllm.c')\n")
    (pkg / "d.py").write_text("import importlib\nBACKENDS = {'x': 'nemo_avllm.c'}\nimportlib.import_module(BACKENDS['x'])\n")
    (pkg / "c.py").write_text("from nemo_avllm.sub import a\na._secret()\n")
    mods = {m: p for m, p in {
        "nemo_avllm": pkg / "__init__.py", "nemo_avllm.sub": pkg / "sub" / "__init__.py",
        "nemo_avllm.sub.a": pkg / "sub" / "a.py", "nemo_avllm.sub.b": pkg / "sub" / "b.py",
        "nemo_avllm.c": pkg / "c.py", "nemo_avllm.d": pkg / "d.py"}.items()}
    assert [t for t, *_ in _imports("nemo_avllm.sub.a", mods["nemo_avllm.sub.a"], mods)] == ["nemo_avllm.sub.b"]
    assert [t for t, *_ in _imports("nemo_avllm.sub.b", mods["nemo_avllm.sub.b"], mods)] == ["nemo_avllm.c"]
    assert [t for t, *_ in _imports("nemo_avllm.d", mods["nemo_avllm.d"], mods)] == ["nemo_avllm.c"]
    assert _imports("nemo_avllm.c", mods["nemo_avllm.c"], mods)[0][3] == "a"
    assert _private_attributes(mods["nemo_avllm.c"], {"a": "nemo_avllm.sub.a"}) == [(2, "nemo_avllm.sub.a", "_secret")]
    assert part_of("nemo_avllm.data.decode") == "nemo_avllm.data" and part_of("dali_pipelines.video") == "dali_pipelines"


def test_modules_have_no_import_cycle():
    graph, _ = import_graph()
    assert graph["nemo_avllm.data.dataset"] and graph["nemo_avllm.cli"], "the parser found no imports"
    cycles = all_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_subpackages_have_no_import_cycle():
    graph, _ = import_graph()
    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        parts.setdefault(part_of(module), set()).update(part_of(t) for t in targets if part_of(t) != part_of(module))
    assert len(parts) > 10, sorted(parts)
    cycles = all_cycles(parts)
    assert not cycles, "cycles between subpackages:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_file():
    _, private = import_graph()
    assert not private, "private names of one file used by another:\n" + "\n".join(private)


def test_the_data_code_never_reads_the_model_config():
    """`data/` and `dali_pipelines/` are handed a `DataSpec` (T/N/K, decode settings, batch geometry):
    they import neither the model, nor the training code, nor the config loader, nor OmegaConf."""
    graph, _ = import_graph()
    data = [m for m in graph if m.startswith(("nemo_avllm.data", "dali_pipelines"))]
    assert "nemo_avllm.data.loaders" in data and "nemo_avllm.data.spec" in data
    banned = ("nemo_avllm.model", "nemo_avllm.training", "nemo_avllm.config", "nemo_avllm.hf", "nemo_avllm.inference")
    reads = [f"{m} -> {t}" for m in data for t in sorted(graph[m]) if t.startswith(banned)]
    omegaconf = [m for m in data if "omegaconf" in module_files()[m].read_text()]
    assert not reads and not omegaconf, "the data code reads configuration itself:\n" + "\n".join(reads + omegaconf)


def test_no_module_is_over_450_lines():
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines (split them by idea): {long}"
