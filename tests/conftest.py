"""Test setup: 8 forced CPU devices (so every pmapped path runs on more than one device)
and shared fixtures. XLA_FLAGS must be set before jax is imported anywhere."""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its subprocesses included: the tests build the
# same small models and steps again and again, and each compilation is seconds on two cores.
# Made anew each session, so it never holds programs of other code.
_CACHE = tempfile.mkdtemp(prefix="resnet_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from resnet_jax import tfds_writer  # noqa: E402

# CIFAR-10's real images (JPEG folders, .tar.xz): the tests' data sets are made of them where the
# archive exists ($CIFAR10_ARCHIVE, by default a folder beside the repository), and of the writer's
# learnable synthetic stand-ins elsewhere, so the suite runs anywhere the package is installed.
CIFAR10_ARCHIVE = os.environ.get("CIFAR10_ARCHIVE", os.path.join(ROOT, "..", "shared", "data", "cifar10_jpeg.tar.xz"))


def archive_line() -> str:
    """Whether the tests' images are CIFAR-10's (as .ci/run says at its start too)."""
    path = os.path.abspath(CIFAR10_ARCHIVE)
    if os.path.exists(path):
        return f"CIFAR-10 JPEG archive: found at {path}"
    return f"CIFAR-10 JPEG archive: absent ({path}): tests use synthetic images"


def pytest_report_header(config):
    return archive_line()


class SyntheticImagesWarning(UserWarning):
    """The tests' data sets are synthetic stand-ins: CIFAR10_ARCHIVE does not exist."""


_said_synthetic = False


def cifar10_splits(sizes):
    """CIFAR-10 splits of `sizes` ({split: count}) class-balanced images: real ones from
    CIFAR10_ARCHIVE if it exists, else synthetic ones, saying so once per session (a warning in
    pytest's summary, -q or not)."""
    global _said_synthetic
    if os.path.exists(CIFAR10_ARCHIVE):
        return tfds_writer.read_archive(CIFAR10_ARCHIVE, sizes)
    if not _said_synthetic:
        _said_synthetic = True
        warnings.warn(
            SyntheticImagesWarning(f"{archive_line()} (set CIFAR10_ARCHIVE to the archive for real ones)"),
            stacklevel=2,
        )
    return tfds_writer.synthetic(10, sizes)


def make_tfds_cifar10(data_dir, train, test):
    """A real-format tfds cifar10 (array_record) in `data_dir` with `train` and `test` images (cifar10_splits)."""
    splits = cifar10_splits({"train": train, "test": test})
    tfds_writer.write(str(data_dir), "cifar10", splits, {"label": tfds_writer.CIFAR10_LABELS})
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
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


# One machine as two hosts: each process forces 2 CPU devices, and they talk through gloo.
TWO_HOSTS = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def start_processes(args, launch):
    """Starts the processes of one multi-process run: `python run.py ARGS` once per (flags,
    environment) of `launch` (`flags_launch()`, `slurm_launch()`), each also with TWO_HOSTS.
    Returns their Popen objects."""
    return [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run.py"), *args, *flags],
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **TWO_HOSTS, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags, env in launch
    ]


def finish(processes, timeout=300):
    """Each process's CompletedProcess, killing any still running after `timeout` s."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def wait_until(condition, timeout: float, interval: float = 0.02) -> None:
    """Polls `condition()` every `interval` seconds until it holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(interval)


def free_port(low=20000, high=40000):
    """A TCP port in [low, high) that nothing listens on now."""
    start = os.getpid() % (high - low)
    for offset in range(high - low):
        port = low + (start + offset) % (high - low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def flags_launch(n=2):
    """The multi-host flags of each of `n` processes on this machine, a free port for the coordinator."""
    port = free_port()
    return [
        ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"], {}) for i in range(n)
    ]


def slurm_launch(n=2):
    """The environment srun gives each of `n` tasks of one job on this machine. jax derives the
    coordinator's port from the job id (61440 + id % 4096): the id is picked for a free one."""
    job_id = free_port(61440, 65536) - 61440
    common = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(n)}
    return [([], dict(common, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(n)]
