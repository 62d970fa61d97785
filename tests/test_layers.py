"""The layers, one way: array core <- methods <- backends <- application <- cli.

Walks every import of `camcore` and `backends` (imports inside functions count, and so do
``importlib.import_module("...")`` calls with a constant name) and fails on an import against the
direction, on a module imported from `backends` anywhere but in the application (and there only
inside a function), and on a circle.  A new module must be given its layer here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("camcore", "backends")

CORE, METHODS, BACKENDS, APPLICATION, CLI = range(5)
LAYER_NAMES = ("array core", "methods", "backends", "application", "cli")

# camcore's top-level modules, by layer; packages are classified whole below.
CORE_MODULES = {"camcore", "camcore.errors", "camcore._validate", "camcore.backend", "camcore.maps",
                "camcore.localize", "camcore.render", "camcore.preprocess", "camcore.metrics", "camcore.wsol",
                "camcore.faithfulness", "camcore.scores", "camcore.default_model", "camcore.tokens"}
APPLICATION_MODULES = {"camcore.api", "camcore.explainer", "camcore.evaluation", "camcore.compare", "camcore.drift",
                       "camcore.distributed", "camcore.outputs", "camcore.benchmark", "camcore.token_explain",
                       "camcore.targets", "camcore.saved_maps", "camcore.coco", "camcore.report"}


def layer(module: str) -> int | None:
    if module == "backends" or module.startswith("backends."):
        return BACKENDS
    if module in ("camcore.methods", "camcore.perturbation") or module.startswith("camcore.methods."):
        return METHODS
    if module == "camcore.cli" or module.startswith("camcore.cli."):
        return CLI
    if module in CORE_MODULES:
        return CORE
    if module in APPLICATION_MODULES:
        return APPLICATION
    return None


def modules() -> dict:
    """module name -> (path, is_package) for every source file of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = (path, is_package)
    return found


def _resolve(name: str, known: dict) -> str | None:
    """The longest known module that `name` is or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, is_package: bool, known: dict) -> list:
    """``(target module, line, inside a function)`` for each internal import of `module`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    base = module if is_package else module.rpartition(".")[0]
    edges = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    origin = f"{anchor}.{child.module}" if child.module else anchor
                else:
                    origin = child.module or ""
                # `from package import submodule` imports the submodule
                names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                         for alias in child.names]
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                  == "import_module" and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                target = child.args[0].value
                if target.startswith(".") and len(child.args) > 1:
                    target = base + target if target != "." else base
                names = [target]
            for name in names:
                target = _resolve(name, known)
                if target is not None and target != module:
                    edges.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return edges


KNOWN = modules()
EDGES = {module: imports(module, path, is_package, KNOWN) for module, (path, is_package) in KNOWN.items()}


def _where(module: str, line: int) -> str:
    return f"{KNOWN[module][0].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    unknown = sorted(m for m in KNOWN if layer(m) is None)
    assert not unknown, f"give these modules a layer in tests/test_layers.py: {unknown}"


def test_imports_go_one_way():
    wrong = []
    for module, edges in EDGES.items():
        for target, line, in_function in edges:
            src, dst = layer(module), layer(target)
            if src is None or dst is None:
                continue
            if dst > src:
                wrong.append(f"{_where(module, line)}: {LAYER_NAMES[src]} {module} imports "
                             f"{LAYER_NAMES[dst]} {target}")
            elif dst == BACKENDS and src != BACKENDS and (src != APPLICATION or not in_function):
                wrong.append(f"{_where(module, line)}: {module} imports {target}; only the application "
                             "imports backends, inside functions")
    assert not wrong, "imports against the layers:\n" + "\n".join(dict.fromkeys(wrong))


def _facade(module: str, target: str) -> bool:
    """A package's __init__ importing its own submodules (its public names) is no circle."""
    return KNOWN[module][1] and target.startswith(module + ".")


def test_no_circles():
    graph = {m: sorted({t for t, _, _ in edges if not _facade(m, t)}) for m, edges in EDGES.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("source, expected", [
    ("from .maps import upsample\n", ["camcore.maps"]),
    ("def f():\n    from backends import onnx_graph\n", ["backends.onnx_graph"]),
    ("import importlib\nimportlib.import_module('backends.fuse_graph')\n", ["backends.fuse_graph"]),
    ("from . import errors, maps\n", ["camcore.errors", "camcore.maps"]),
])
def test_the_walker_sees_imports(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = {**KNOWN, "camcore.probe": (path, False)}
    assert sorted(t for t, _, _ in imports("camcore.probe", path, False, known)) == expected


def test_the_rule_catches_a_wrong_import(tmp_path):
    """A core module importing the explainer, and the cli importing backends, are both caught."""
    path = tmp_path / "probe.py"
    path.write_text("from .explainer import Explainer\ndef f():\n    import backends.onnx_graph\n")
    known = {**KNOWN, "camcore.maps": (path, False)}
    edges = imports("camcore.maps", path, False, known)
    assert [(layer(t), in_f) for t, _, in_f in edges] == [(APPLICATION, False), (BACKENDS, True)]
    assert all(layer(t) > layer("camcore.maps") for t, _, _ in edges)


def test_ort_runtime_imports_no_other_backends_module():
    """Session making sits under every backends module that runs a graph."""
    assert [t for t, _, _ in EDGES["backends.ort_runtime"] if layer(t) == BACKENDS] == []


@pytest.mark.parametrize("argv", [["--help"], ["explain", "--help"], ["eval", "--help"]])
def test_help_loads_no_runtime_nor_numpys_dependents(argv):
    code = ("import sys, contextlib, io\n"
            "import camcore\n"
            "from camcore import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: cli.main({argv!r})\n"
            "    except SystemExit: pass\n"
            "loaded = [m for m in ('scipy', 'skimage', 'PIL', 'onnx', 'onnxruntime', 'backends') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
