"""The device check: its dry run on this CPU (every stage, every field), and its budget."""

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT

STAGES = ("setup", "tests", "speed", "airbench94", "resnet18")


def load_device_check():
    path = os.path.join(ROOT, "benchmarks", "device_check.py")
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_wheel(folder, name, version):
    """A pure-Python wheel of package `name`, whose `VERSION` is `version`."""
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")


@pytest.mark.slow
def test_dry_run_completes_every_stage_and_writes_every_field(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "device_check_probe", "1.0")  # which this Python lacks: installed
    write_wheel(wheels, "numpy", "0.0.1")  # which it has: left alone
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "device_check.py"),
            "--out",
            str(out),
            "--dry-run",
            "--wheels",
            str(wheels),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "device_check.json").read_text())
    log = (out / "device_check.log").read_text()
    assert result["dry_run"] is True and result["total_seconds"] < result["budget_seconds"]
    for stage in STAGES:
        assert result[stage]["status"] == "ok", (stage, result[stage], log[-3000:])
    assert result["jax_version"] and result["backend"] == "cpu" and result["device_count"] == 8
    setup = result["setup"]
    assert (setup["train_examples"], setup["test_examples"], setup["wheels_installed"]) == (640, 100, 1)
    assert (out / "site" / "device_check_probe").is_dir() and not (out / "site" / "numpy").exists()
    assert result["tests"]["passed"] >= 1 and "failed" not in result["tests"]
    speed = result["speed"]
    for dtype in ("float32", "bfloat16"):
        assert speed[dtype]["dtype"] == dtype and speed[dtype]["train_images_per_sec"] > 0
        assert speed[dtype]["train_tflops_per_sec"] > 0 and "input_leaves_devices_idle" in speed[dtype]
    if "torch_bfloat16" in speed:
        assert speed["jax_over_torch_bfloat16"] > 0
    else:  # No torch here: the reference is skipped, and says so.
        assert "torch is not installed" in speed["message"]
    assert speed["peak_bf16_tflops"] is None and "mfu_bfloat16" not in speed  # A CPU has no bf16 peak in the table.
    for stage, epochs in (("airbench94", 2.0), ("resnet18", 0.5)):
        run = result[stage]
        assert run["epochs"] == pytest.approx(epochs) and 0 <= run["test_accuracy"] <= 1
        assert 0 < run["wall_seconds_without_compilation"] < run["wall_seconds"]
        assert set(run["seconds_to_accuracy"]) == {"0.9", "0.93", "0.94", "0.95"}
    assert result["resnet18"]["estimated_seconds"] > 30  # the recipe's estimate, from the measured speed
    assert "$ " in log and "stage resnet18" in log


def test_a_stage_is_skipped_with_the_time_it_needs_or_the_stage_it_needs(tmp_path):
    check = load_device_check().Check(str(tmp_path), budget=60)
    check.stage("speed", 600, lambda: pytest.fail("ran past the budget"))
    check.stage("resnet18", lambda: 1234.5, lambda: pytest.fail("ran past the budget"))
    check.stage("airbench94", 0, lambda: pytest.fail("ran without its data"), requires=("setup",))
    check.stage("setup", 1, lambda: {"train_examples": 640})
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert results["speed"] == {"status": "skipped", "message": "60 s left of the budget; the stage needs about 600 s"}
    assert results["resnet18"]["message"].endswith("the stage needs about 1234 s")
    assert results["airbench94"] == {"status": "skipped", "message": "needs the setup stage"}
    assert results["setup"]["status"] == "ok" and results["setup"]["train_examples"] == 640


def test_a_failing_stage_costs_no_other_and_a_command_never_outlives_the_budget(tmp_path):
    check = load_device_check().Check(str(tmp_path), budget=3)
    check.stage("tests", 0, lambda: 1 / 0)
    began = time.monotonic()
    code, output = check.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    assert code is None and "started" in output and "the budget ran out" in output
    assert time.monotonic() - began < 10
    assert check.results["tests"]["status"] == "failed" and "ZeroDivisionError" in check.results["tests"]["message"]


def test_the_recipe_estimate_counts_its_epochs_evaluations_and_compilations():
    device_check = load_device_check()
    config = runpy.run_path(os.path.join(ROOT, "configs", "resnet18.py"))["get_config"]()
    speed = {"train_images_per_sec": 20_000.0, "eval_images_per_sec": 50_000.0, "compile_seconds": 10.0}
    # 200 epochs of 50,000 images at 20,000/s, 200 evaluations of 10,000 at 50,000/s, two compilations.
    assert device_check.recipe_seconds(config, speed, 50_000, 10_000) == pytest.approx(1.25 * (500 + 40 + 20) + 30)
