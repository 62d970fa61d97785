"""The application and command-line layers: who may import `backends` and `camcore.cli`, and what the CLI loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = ("api", "explainer", "evaluation", "compare", "distributed", "benchmark", "outputs")


def _imports(path: Path) -> list:
    """``(module imported, at module level?)`` for every import in `path`, relative ones made absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [f"{base}.{alias.name}" for alias in node.names] if not node.module else [base]
            found += [(name, id(node) in top) for name in names]
    return found


def _modules(folder: str) -> list:
    return sorted((ROOT / folder).rglob("*.py"))


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", _modules("camcore/cli"), ids=lambda p: p.name)
def test_cli_reaches_backends_only_through_the_application(path):
    bad = [name for name, _ in _imports(path) if _is(name, "backends")]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", [p for p in _modules("camcore") if "cli" not in p.relative_to(ROOT).parts],
                         ids=lambda p: str(p.relative_to(ROOT / "camcore")))
def test_nothing_below_the_cli_imports_it(path):
    bad = [name for name, _ in _imports(path) if _is(name, "camcore.cli") or name == "camcore._cli_util"]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", APPLICATION)
def test_application_imports_backends_inside_functions(name):
    bad = [module for module, at_top in _imports(ROOT / "camcore" / f"{name}.py") if at_top and _is(module, "backends")]
    assert bad == [], f"camcore/{name}.py imports {bad} at module level"


def test_import_walker_sees_relative_and_function_imports():
    """The walker itself: a relative import inside a function counts, and is not module level."""
    folder = ROOT / "camcore" / "cli"
    found = dict(_imports(folder / "explain.py"))
    assert found["camcore.outputs"] is True and found["camcore.distributed"] is False
    assert found["camcore.cli.console"] is True


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
