"""The import graph keeps the layers apart: the library never reaches up into the TUI, a stage or a
benchmark; stages never import each other; the TUI never imports a stage; and no module imports
itself back through others. Every import counts, also the ones inside functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nanochat", "stages", "tui", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def layer(module: str) -> str:
    return module.split(".")[0]


def forbidden(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == "nanochat":
        return b in ("tui", "stages", "bench")
    if a == "stages":
        return b == "stages" and dst != "stages" and src != "stages"  # the package __init__ may be imported
    if a == "tui":
        return b in ("stages", "bench")
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_layers_are_respected():
    bad = sorted(f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts if forbidden(src, dst))
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in import_graph().items()}
    cycle = find_cycle(graph)  # a package's submodule importing the package __init__ is not a cycle of interest
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("src,dst,bad", [("nanochat.gpt", "tui.app", True), ("stages.chat_sft", "stages.mid_train", True),
                                         ("tui.app", "stages.base_train", True), ("stages.chat_sft", "nanochat.training", False),
                                         ("tui.app", "nanochat.supervisor", False), ("bench.train", "nanochat.gpt", False)])
def test_the_rules_themselves(src, dst, bad):
    assert forbidden(src, dst) is bad


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
