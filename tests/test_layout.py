"""The package's shape, checked: where the device layout lives, how long a function may grow,
and that the loop reads on one screen. (The import layers are import-linter's contracts in
pyproject.toml, checked by `lint-imports` in CI.)"""

import ast
import glob
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "resnet_jax")
SOURCES = sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)) + [os.path.join(ROOT, "run.py")]
# What only the device-layout module may call: a jit-over-a-mesh layout replaces that one module.
DEVICE_LAYOUT_NAMES = ("pmap", "jax_utils", "prefetch_to_device", "device_put_replicated", "multihost_utils")
MAX_FUNCTION_LINES = 70
MAX_LOOP_LINES = 60


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def functions(path):
    for node in ast.walk(parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def names_used(path):
    """Every attribute, name and imported name in the file."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield from alias.name.split(".")
        elif isinstance(node, ast.ImportFrom):
            yield from (node.module or "").split(".")
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_only_the_device_layout_module_knows_pmap(path):
    used = set(names_used(path)) & set(DEVICE_LAYOUT_NAMES)
    if os.path.relpath(path, PACKAGE) == "parallel.py":
        assert {"pmap", "jax_utils", "prefetch_to_device"} <= used
    else:
        assert not used, f"{path} uses {sorted(used)}: that belongs in resnet_jax/parallel.py"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_function_is_longer_than_70_lines(path):
    long = {name: n for name, n in functions(path) if n > MAX_FUNCTION_LINES}
    assert not long, f"split these: {long}"


def test_the_train_loop_reads_on_one_screen():
    lengths = dict(functions(os.path.join(PACKAGE, "loop.py")))
    assert lengths["train_and_evaluate"] <= MAX_LOOP_LINES


def test_the_checks_can_fail(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("import jax\n\ndef f():\n" + "    x = 1\n" * 70 + "    return jax.pmap(f)\n")
    assert "pmap" in set(names_used(str(offender)))
    assert dict(functions(str(offender)))["f"] == 72
