"""The tree's shape: which package may import which (the arrows cloud -> formats <- device), and module size.

Imports are read with ast from every module, the ones inside functions too, so a lazy import cannot hide
an arrow that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the mist packages its modules may import. kit is the CLIs' shared kit (click only), ship the
# transport both sides use; neither may reach into a side.
ALLOWED = {
    "formats": {"formats"},
    "kit": {"kit"},
    "ship": {"ship", "formats", "kit"},
    "cloud": {"cloud", "formats", "kit", "ship"},
    "device": {"device", "formats", "kit", "ship"},
}
TOP_LEVEL = ("cloud", "device", "formats", "kit", "ship", "tests")
MAX_LINES = 400


def packages() -> list[str]:
    return [p for p in ALLOWED if (ROOT / p).is_dir()]


def mist_imports(path: Path, package: str | None) -> set[str]:
    """The mist packages (and bare top-level folders, the old way of reaching them) a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                if package is None:
                    continue
                names = [f"mist.{package}"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mist" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in TOP_LEVEL:
                found.add(f"bare:{parts[0]}")
    return found


@pytest.mark.parametrize("package", packages())
def test_each_package_imports_only_what_its_arrows_allow(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = mist_imports(path, package) - ALLOWED[package]
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports against the arrows: {wrong}"


def test_benchmarks_and_scripts_reach_the_code_only_as_mist():
    wrong = {}
    for folder in ("benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = {name for name in mist_imports(path, None) if name.startswith("bare:")}
            if bad:
                wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"import cloud/device/formats/tests directly instead of mist.*: {wrong}"


def test_no_module_is_over_400_lines():
    long = {}
    for folder in (*packages(), "benchmarks", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long[str(path.relative_to(ROOT))] = lines
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_training_step_is_defined_once():
    definitions = []
    for folder in (*packages(), "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name in ("train_step", "loss_and_grads"):
                    definitions.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert definitions == ["device/step.py:loss_and_grads", "device/step.py:train_step"], definitions
