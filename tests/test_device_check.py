"""The prepared GPU check, run in --dry-run on this CPU: every stage, every JSON field."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_dry_run_completes_every_stage_and_writes_every_field(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), "--out", str(tmp_path), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    log = (tmp_path / "device_check.log").read_text()
    assert result["dry_run"] is True and result["total_seconds"] < result["budget_seconds"]
    for stage in ("setup", "newest_jax", "speed", "time_to_accuracy"):
        assert result[stage]["status"] == "ok", (stage, result[stage], log[-3000:])
    assert result["jax_version"] and result["backend"] == "cpu" and result["device_count"] == 8
    setup = result["setup"]
    assert (setup["train_examples"], setup["test_examples"]) == (640, 100)
    for tier in ("cpu_tests", "gpu_tests"):
        assert result["newest_jax"][tier]["passed"] >= 1 and result["newest_jax"][tier]["failed"] == 0
    speed = result["speed"]
    assert speed["bfloat16_sharded"]["parallel"] == "sharded" and speed["sharded_over_pmap_bfloat16"] > 0
    for dtype in ("float32", "bfloat16"):
        assert speed[dtype]["dtype"] == dtype and speed[dtype]["train_images_per_sec"] > 0
        assert speed[dtype]["train_tflops_per_sec"] > 0 and "input_leaves_devices_idle" in speed[dtype]
    if speed["torch_version"] is None:  # No torch here: the reference is skipped, and says so.
        assert "torch is not installed" in speed["message"]
    else:
        assert speed["jax_over_torch_bfloat16"] > 0
    assert speed["peak_bf16_tflops"] is None and speed["mfu_bfloat16"] is None  # A CPU has no bf16 peak in the table.
    tta = result["time_to_accuracy"]
    assert tta["epochs"] == pytest.approx(2.0) and 0 <= tta["test_accuracy"] <= 1
    assert 0 < tta["wall_seconds_without_compilation"] < tta["wall_seconds"]
    assert set(tta["seconds_to_accuracy"]) == {"0.9", "0.93", "0.94", "0.95"}
    assert "$ " in log and "stage time_to_accuracy" in log


def test_a_stage_that_would_overrun_the_budget_is_skipped_with_a_message(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "device_check.py"),
            "--out",
            str(tmp_path),
            "--dry-run",
            "--budget",
            "12",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    skipped = [s for s in ("setup", "newest_jax", "speed", "time_to_accuracy") if result[s]["status"] == "skipped"]
    assert skipped and all(
        "left of the budget" in result[s]["message"] or "no data set" in result[s]["message"] for s in skipped
    )
    assert result["total_seconds"] < 12 + 30  # A running command is killed when the budget runs out.
