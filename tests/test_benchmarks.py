"""The benchmark scripts run end to end and report positive numbers (no timing assertions)."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from resnet_jax import models


def run_benchmark(script, *args, env=None):
    """The JSON line `benchmarks/SCRIPT ARGS --json` prints, run in a subprocess (8 CPU devices, unless `env` says)."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


@pytest.mark.slow
def test_throughput_reports_train_eval_compile_and_memory():
    result = run_benchmark(
        "throughput.py",
        "--model",
        "resnet8",
        "--batch-size",
        "16",
        "--eval-batch-size",
        "40",
        "--steps",
        "2",
        "--repeats",
        "1",
    )
    assert result["backend"] == "cpu" and result["devices"] == 8
    assert (result["model"], result["batch_size"], result["eval_batch_size"], result["dtype"]) == (
        "resnet8",
        16,
        40,
        "float32",
    )
    for key in ("train_images_per_sec", "eval_images_per_sec", "compile_seconds", "peak_host_memory_mb"):
        assert result[key] > 0, key
    assert result["augmentation_share"] < 1
    assert 0 <= result["input_wait_share"] < 1
    # A train step costs about three forward passes (forward, input and weight gradients) of its 16 images.
    model = models.get_model("resnet8", num_classes=10)
    image = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), image, train=False)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image).cost_analysis()["flops"]
    assert 2.5 < result["train_flops_per_step"] / (16 * forward) < 3.5
    assert result["input_leaves_devices_idle"] == (result["input_wait_share"] > 0.03)
    assert result["device_peak_memory_mb"] is None  # The CPU reports no memory statistics.
    parts = result["memory_breakdown_mb"]
    assert parts["data"] == round((50_000 + 10_000) * (32 * 32 * 3 + 4) / 2**20, 1)  # uint8 images, int32 labels
    assert min(parts["train_state"], parts["train_step_scratch"], parts["eval_step_scratch"]) > 0
    assert sum(parts.values()) < result["peak_host_memory_mb"]


@pytest.mark.slow
def test_input_pipeline_reports_host_and_transfer_rates():
    result = run_benchmark(
        "input_pipeline.py", "--batch-size", "64", "--num-train", "1000", "--steps", "3", "--repeats", "1"
    )
    assert (result["batch_size"], result["num_train"], result["devices"]) == (64, 1000, 8)
    assert result["host_images_per_sec"] > 0 and result["images_per_sec"] > 0


def load_benchmark(script):
    """benchmarks/SCRIPT imported as a module."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), os.path.join(ROOT, "benchmarks", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_conv_ops_times_every_convolution_of_the_model(name):
    conv_ops = load_benchmark("conv_ops.py")
    model = models.get_model(name, num_classes=10, stem="cifar")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    kernels = collections.Counter(
        (k, cin, cout)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim == 4
        for k, _, cin, cout in [leaf.shape]
    )
    shapes = collections.Counter()
    for (_, cin, cout, k, _), count in conv_ops.layer_shapes(conv_ops.STAGE_SIZES[name]).items():
        shapes[(k, cin, cout)] += count
    assert shapes == kernels


@pytest.mark.slow
def test_conv_ops_reports_forward_and_gradient_times():
    result = run_benchmark("conv_ops.py", "--batch-size", "2", "--repeats", "1")
    assert (result["model"], result["batch_size"], result["dtype"]) == ("resnet18", 2, "float32")
    for side in ("jax_ms", "torch_ms") if importlib.util.find_spec("torch") else ("jax_ms",):
        totals = result[side]
        assert min(totals["forward"], totals["dx"], totals["dw"]) > 0
        assert totals["all"] == pytest.approx(totals["forward"] + totals["dx"] + totals["dw"], abs=0.2)


def test_op_profile_classifies_the_compiled_steps_operations():
    op_profile = load_benchmark("op_profile.py")

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jax.nn.relu(y) ** 2)

    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    kinds = op_profile.hlo_kinds(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text())
    assert {"convolution forward", "convolution gradients (input and weight)", op_profile.ELEMENTWISE} <= set(
        kinds.values()
    )


@pytest.mark.slow
def test_op_profile_reports_every_kind_of_operation_of_the_jax_step():
    op_profile = load_benchmark("op_profile.py")
    # One CPU device: its operations' intervals, unlike 8 devices' summed, lie within the step.
    one_device = " ".join(f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f)
    args = ("--model", "resnet8", "--batch-size", "8", "--steps", "1", "--no-torch")
    result = run_benchmark("op_profile.py", *args, env={**os.environ, "XLA_FLAGS": one_device})
    assert list(result["sides"]) == ["JAX"]
    rows = {row[0]: row[1:] for row in result["rows"]}
    assert list(rows) == [*op_profile.KINDS, "step"]
    step_ms, share = rows.pop("step")
    assert step_ms > 0 and share == 100
    assert rows[op_profile.ELEMENTWISE][0] > 0
    assert rows[op_profile.UNTRACED][0] > 0  # XLA:CPU's convolutions leave no trace event
    assert sum(ms for ms, _ in rows.values()) >= 0.99 * step_ms  # the untraced remainder completes the step


def test_op_profile_asks_for_airbench_for_the_pytorch_side_of_airbench():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "op_profile.py"), "--config", "configs/airbench93.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "--airbench" in done.stderr.strip().splitlines()[-1], done.stderr
