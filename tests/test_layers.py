"""The package's imports, parsed: no cycle, and no import against the layer order of DESIGN.md.

Every `import` counts, also those inside functions (a lazy import hides a cycle, it does not
remove it). `from P import name` depends on the module P.name where that is a module, else on P
itself (its __init__).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qla_kernels"
# Lowest first; a module may import its own layer and the layers before it. The package root's
# modules (the public API, cli, launch_table) may import anything, and nothing imports them.
LAYERS = ("formats", "quant", "ops", "nn", "models", "methods", "integrations", "apps")
EXTENSIONS = ("qla_kernels._C", "qla_kernels._cpu")  # built by setup.py; import nothing of the package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(modules) | set(EXTENSIONS)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.startswith("qla_kernels"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("qla_kernels"):
                    continue
                submodules = {f"{source}.{alias.name}" for alias in node.names} & known
                targets.update(submodules)
                if len(submodules) < len(node.names):
                    targets.add(source)
        graph[name] = {target for target in targets if target in known and target != name}
    return graph


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "qla_kernels.ops.reference" in graph["qla_kernels.ops.library"]
    assert "qla_kernels._C" in graph["qla_kernels.ops.device"]  # inside a function
    assert "qla_kernels.formats.weights" in graph["qla_kernels.ops"]


def test_no_import_cycle():
    graph = import_graph()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_imports_follow_the_layer_order():
    wrong = []
    for module, targets in import_graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in targets:
            if target in EXTENSIONS:
                continue
            target_layer = _layer(target)
            if target_layer is None or LAYERS.index(target_layer) > LAYERS.index(layer):
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer or 'package root'})")
    assert not wrong, "\n".join(sorted(wrong))
