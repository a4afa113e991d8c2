"""The commands in README.md and docs/ stay true: every `run.py` command names config files,
modes, flags and `--config.*` fields that exist, and the quick ones run as written."""

import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
RUN_PY = open(os.path.join(ROOT, "run.py")).read()
FLAGS = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", RUN_PY))
MODES = set(re.search(r"\"mode\",\s*\"train\",\s*\[([^\]]*)\]", RUN_PY)[1].replace('"', "").replace(" ", "").split(","))


def commands():
    """(file, command) for each `run.py` command in the docs: indented code lines and `inline` code."""
    found = []
    for path in DOCS:
        text = open(path).read()
        lines = [line.strip() for line in text.splitlines() if line.startswith("    ")]
        lines += re.findall(r"`([^`\n]*run\.py[^`\n]*)`", text)
        for line in lines:
            match = re.search(r"python3? run\.py( .*)?$", line.lstrip("$ "))
            if match:
                found.append((os.path.relpath(path, ROOT), match[0]))
    return found


COMMANDS = commands()


def arguments(command):
    """The command's arguments, without the `[optional ...]` brackets and `...` the docs use."""
    words = shlex.split(command.split("#")[0].replace("[", " ").replace("]", " "))
    return [w for w in words[words.index("run.py") + 1 :] if w not in ("...", "\\")]


def test_the_docs_hold_run_commands():
    assert len(COMMANDS) >= 15 and {"README.md", "docs/measurements.md"} <= {path for path, _ in COMMANDS}


@pytest.mark.parametrize("path,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_each_run_command_names_what_exists(path, command):
    words = arguments(command)
    config = None
    for i, word in enumerate(words):
        if word == "--config":
            name = words[i + 1]
            if name.isupper() or "CONFIG" in name:  # a placeholder, e.g. configs/CONFIG.py
                continue
            assert os.path.exists(os.path.join(ROOT, name)), f"{path}: no config file {name}"
            config = importlib.import_module(name[:-3].replace("/", ".")).get_config()
        elif word == "--mode" and not words[i + 1].isupper():
            assert words[i + 1] in MODES, f"{path}: no mode {words[i + 1]!r} in {command}"
        elif word.startswith("--config."):
            field = word[len("--config.") :].split("=")[0]
            if field.isupper():  # a placeholder: --config.FIELD=VALUE
                continue
            node = config or importlib.import_module("configs.default").get_config()
            for key in field.split("."):
                assert key in node, f"{path}: no config field {field} in {command}"
                node = node[key]
        elif word.startswith("--") and word != "--config":
            name = word[2:].split("=")[0]
            assert name in FLAGS or name.startswith("no") and name[2:] in FLAGS, f"{path}: no flag --{name}"


def test_the_summary_command_runs_as_written():
    (command,) = {c for _, c in COMMANDS if "--mode summary" in c}
    result = run_cli(*arguments(command), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "11,173,962" in result.stdout  # ResNet-18's parameters, CIFAR stem


def test_the_readme_test_command_collects():
    readme = open(os.path.join(ROOT, "README.md")).read()
    (command,) = re.findall(r"^    (python -m pytest .*)$", readme, re.MULTILINE)
    words = shlex.split(command)
    result = subprocess.run(
        [sys.executable, *words[1:], "--collect-only", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert re.search(r"\d+(/\d+)? tests collected", result.stdout), result.stdout[-500:]
