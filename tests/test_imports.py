"""The package's layering: no import cycle (imports inside functions count) and no low layer
reaching up into the trainer. Read from the source, so it needs no import of the package."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxunified"
# Layers that must never import jaxunified.train (configs/ included: a config is plain data).
BELOW_TRAIN = ("configs", "jaxunified/models", "jaxunified/nn", "jaxunified/quant", "jaxunified/losses",
               "jaxunified/data", "jaxunified/convert", "jaxunified/parallel", "jaxunified/eval")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every jaxunified module ``path`` imports, at any depth (``from a import b`` counts ``a.b``
    when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "jaxunified"}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in files and m != name} for name, p in files.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_lower_layers_never_import_the_trainer():
    bad = []
    for layer in BELOW_TRAIN:
        for p in (ROOT / layer).rglob("*.py"):
            hits = sorted(m for m in _imports(p) if m == "jaxunified.train" or m.startswith("jaxunified.train."))
            if hits:
                bad.append(f"{p.relative_to(ROOT)} imports {hits}")
    assert not bad, "\n".join(bad)


def test_tasks_never_import_each_other():
    from jaxunified.train.task import TASKS  # noqa: PLC0415  (the registry is the list of task modules)

    tasks = {spec.split(":")[0] for spec in TASKS.values()}
    graph = _graph()
    bad = {t: sorted(graph[t] & (tasks - {t})) for t in tasks if graph[t] & (tasks - {t})}
    assert not bad, bad
