"""The package's layout and its layering rules, as the package docstring states them."""

import ast
import pathlib
import subprocess
import sys

import pytest

import selfkd_tf

PACKAGE = pathlib.Path(selfkd_tf.__file__).parent

LAYERS = {
    "errors": 0, "files": 0, "registration": 0,
    "metrics": 1,
    "rundir": 2, "models": 2, "data": 2, "optimizers": 2, "distribution": 2,
    "report": 3,
    "distillation": 4,
    "evaluation": 5, "serving": 5,
    "experiment": 6,
    "tuning": 7,
    "cli": 8,
}
"""Each part of the package, and its layer: a part imports only parts of lower
layers (and itself). The package docstring lists the same layers."""

WITHOUT_TENSORFLOW = ("selfkd_tf.metrics", "selfkd_tf.rundir", "selfkd_tf.report",
                      "selfkd_tf.cli.report")


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: pathlib.Path, module: str, modules, top_level_only: bool) -> set[str]:
    """The package's modules ``module`` imports (at its top level only, when asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` needs the module; `from module
            # import name` the module.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        # A module's own packages are imported before it, whatever it imports.
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        found |= {name for name in names if name in modules and name != module
                  and name not in ancestors}
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_the_top_level_is_the_face_and_concept_subpackages():
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    assert len(modules) <= 6, modules
    assert len(subpackages) >= 6, subpackages
    assert set(modules) | set(subpackages) == set(LAYERS)


def test_every_subpackage_init_only_re_exports():
    for init in PACKAGE.glob("*/**/__init__.py"):
        body = ast.parse(init.read_text()).body
        for node in body:
            docstring = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                         and isinstance(node.value.value, str))
            allowed = isinstance(node, ast.ImportFrom) or docstring or (
                isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"])
            assert allowed, f"{init}: line {node.lineno} does more than re-export"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules, top_level_only=True)
             for name, path in modules.items()}
    # A package's __init__ re-exports its modules; the modules importing
    # their package's siblings through it is what would close a cycle.
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for target in graph[name]:
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_parts_import_only_lower_layers():
    modules = _modules()
    for name, path in modules.items():
        part = _part(name)
        if part == "__init__":
            continue
        for target in _imports(path, name, modules, top_level_only=False):
            other = _part(target)
            if other in (part, "__init__"):
                continue
            assert LAYERS[other] < LAYERS[part], (
                f"{name} (layer {LAYERS[part]}) imports {target} (layer {LAYERS[other]})")


def test_the_distillation_core_never_imports_the_experiment_layer():
    modules = _modules()
    reached, todo = set(), [m for m in modules if _part(m) == "distillation"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += _imports(modules[name], name, modules, top_level_only=False)
    assert not {m for m in reached if _part(m) in ("experiment", "tuning", "cli", "serving")}


def test_reports_and_run_directories_are_read_without_tensorflow():
    code = (f"import sys, selfkd_tf; import {', '.join(WITHOUT_TENSORFLOW)}; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_docstring_states_the_layers():
    rows = [line.split("|") for line in selfkd_tf.__doc__.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    stated = {row[2].strip(): int(row[1]) for row in rows}
    assert stated == LAYERS
