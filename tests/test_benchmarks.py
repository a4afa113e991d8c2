"""The benchmark scripts run end to end and report positive numbers (no timing assertions)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def run_benchmark(script, *args):
    """The JSON line `benchmarks/SCRIPT ARGS --json` prints, run in a subprocess (8 CPU devices)."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_throughput_reports_train_eval_compile_and_memory():
    result = run_benchmark("throughput.py", "--model", "resnet8", "--batch-size", "16", "--steps", "2", "--repeats", "1")
    assert result["backend"] == "cpu" and result["devices"] == 8
    assert (result["model"], result["batch_size"], result["dtype"]) == ("resnet8", 16, "float32")
    for key in ("train_images_per_sec", "eval_images_per_sec", "compile_seconds", "peak_host_memory_mb"):
        assert result[key] > 0, key
    assert result["augmentation_share"] < 1
    assert result["device_peak_memory_mb"] is None  # The CPU reports no memory statistics.


def test_input_pipeline_reports_host_and_transfer_rates():
    result = run_benchmark("input_pipeline.py", "--batch-size", "64", "--num-train", "1000", "--steps", "3", "--repeats", "1")
    assert (result["batch_size"], result["num_train"], result["devices"]) == (64, 1000, 8)
    assert result["host_images_per_sec"] > 0 and result["images_per_sec"] > 0
