"""Test setup: 8 forced CPU devices (so every pmapped path runs on more than one device)
and shared fixtures. XLA_FLAGS must be set before jax is imported anywhere."""

import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The tool that builds a genuine TFDS cifar10 data set from the shared JPEG archive.
TFDS_TOOL = os.environ.get(
    "CIFAR10_TFDS_TOOL", os.path.join(ROOT, "..", "shared", "tools", "cifar10_tfds.py")
)


def make_tfds_cifar10(data_dir, train, test):
    if not os.path.exists(TFDS_TOOL):
        pytest.skip(f"{TFDS_TOOL} not found (set CIFAR10_TFDS_TOOL)")
    subprocess.run(
        [sys.executable, TFDS_TOOL, str(data_dir), "--train", str(train), "--test", str(test)],
        check=True, capture_output=True,
    )
    return str(data_dir)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A real-format tfds cifar10 (array_record) with 2000 train and 500 test images."""
    return make_tfds_cifar10(tmp_path_factory.mktemp("tfds_small"), 2000, 500)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A real-format tfds cifar10 with 640 train and 100 test images, for end-to-end runs."""
    return make_tfds_cifar10(tmp_path_factory.mktemp("tfds_tiny"), 640, 100)


def run_cli(*args, timeout=300, env=None, cwd=ROOT):
    """Runs `python run.py ARGS` in a subprocess with 8 CPU devices; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )
