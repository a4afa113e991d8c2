"""One prepared check on one GPU (H100/H200): the newest JAX, speed against PyTorch, and
time-to-accuracy, in at most 8 minutes, set-up included.

    python benchmarks/device_check.py --out DIR [--wheels .whl] [--archive .carry/cifar10_jpeg.tar.xz]
    python benchmarks/device_check.py --out DIR --dry-run      # every stage at tiny sizes, on this CPU
    python benchmarks/device_check.py --out DIR --dry-run --real-tests --budget 1800   # with the real test selections

Stages, each skipped with a message when what is left of `--budget` would not hold it:

0. setup: installs the wheels in `--wheels` (what a stock CUDA JAX image lacks:
   benchmarks/device_requirements.txt) into a folder put on PYTHONPATH, and builds the real
   CIFAR-10 (tfds cifar10/3.0.2, array_record) from the JPEG archive.
1. newest_jax: the fast test tier under this machine's JAX on 8 CPU devices
   (JAX_PLATFORMS=cpu), then the model and train-step tests on the GPU.
2. speed: benchmarks/throughput.py on the GPU (resnet18, cifar stem, batch 512, float32 and
   bfloat16, and bfloat16 again under the sharded layout: its ratio to pmap): train and eval
   images/s, compile seconds, peak device memory, and MFU (the train step's FLOPs from XLA's
   cost analysis, against the card's dense bf16 peak); then
   benchmarks/torch_reference.py (torch.compile, bf16 autocast, channels_last) on the same
   GPU, and the JAX/PyTorch ratio.
3. time_to_accuracy: run.py, configs/airbench94.py (airbench's 94% recipe) in bfloat16 on the
   real data: its test accuracy (test-time augmentation included) and wall time with and
   without compilation, beside airbench's own 3.83 s on an A100 (3.09 s with torch.compile;
   fp16, compilation and data loading untimed) for 94.01% on the original images.

Writes DIR/device_check.json (every field, null where a stage was skipped) and
DIR/device_check.log (every command and its output).
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
PYTHON = sys.executable

# Dense bf16 peak of one device, TFLOP/s (vendor datasheets, SXM parts): MFU's denominator.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L4": 121.0}
# The GPU tests: the models, the steps and the loop, on one device (by marker: pyproject.toml).
GPU_TESTS = [
    "tests/test_models.py",
    "tests/test_train.py",
    "tests/test_loop.py",
    "-m",
    "not slow and not multidevice and not multiprocess and not zoo",
]
WHEELS_PYTHON = (3, 12)  # the image's Python, which benchmarks/fetch_device_wheels.sh fetches for
ACCURACY_MARKS = (0.90, 0.93, 0.94, 0.95)
# airbench's README: its 94% recipe on an A100 (fp16), eager and with torch.compile, in seconds.
AIRBENCH94_A100_SECONDS = {"eager": 3.83, "torch_compile": 3.09}

# What each stage runs: the real check, and the dry run's tiny stand-ins (about a minute on a CPU).
REAL = {
    "budget": 480,
    "data": [],
    "cpu_tests": ["-m", "not slow"],
    "throughput": [
        "--model",
        "resnet18",
        "--stem",
        "cifar",
        "--batch-size",
        "512",
        "--eval-batch-size",
        "1000",
        "--steps",
        "20",
        "--repeats",
        "3",
    ],
    "torch": ["--model", "resnet18", "--stem", "cifar", "--batch-size", "512", "--steps", "20", "--repeats", "3"],
    "train": [
        "--config",
        "configs/airbench94.py",
        "--config.model.dtype=bfloat16",
        "--config.eval_batch_size=1000",
        "--config.log_every_steps=48",
    ],
    "gpu_tests_timeout": 150,
    "after_tests": 300,  # seconds the CPU tests leave to the speed and time-to-accuracy stages
    "estimates": {"setup": 60, "newest_jax": 120, "speed": 180, "time_to_accuracy": 90},
}
DRY = {
    "budget": 420,  # several times what it takes on a quiet 2-core CPU: room for a loaded one
    "data": ["--train", "640", "--test", "100"],
    "cpu_tests": ["tests/test_tfds_writer.py::test_balanced_subsets_take_every_class_equally"],
    "gpu_tests": ["tests/test_models.py::test_batch_norm_statistics_update_in_train_mode_only"],
    "throughput": [
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
        "--num-train",
        "512",
        "--num-test",
        "40",
    ],
    "torch": ["--model", "resnet18", "--batch-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "1"],
    "train": [
        "--config",
        "configs/smoke.py",
        "--config.num_train_steps=20",
        "--config.eval_every_epochs=1",
        "--config.log_every_steps=5",
    ],
    "gpu_tests_timeout": 150,
    "after_tests": 60,
    "estimates": {"setup": 10, "newest_jax": 15, "speed": 30, "time_to_accuracy": 20},
}


class Check:
    """The budget, the log, and the results being filled in."""

    def __init__(self, out, budget, dry_run):
        self.start = time.monotonic()
        self.budget = budget
        self.dry_run = dry_run
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.log_file = open(os.path.join(out, "device_check.log"), "w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def launch(self, command, env=None):
        """Starts `command` from the repository root, its output going to a temporary file."""
        self.log("$ " + " ".join(command))
        output = tempfile.TemporaryFile("w+")
        process = subprocess.Popen(
            command, cwd=ROOT, env=env or self.env, stdout=output, stderr=subprocess.STDOUT, text=True
        )
        return process, output

    def finish(self, launched, timeout=None):
        """Waits for a launched command; returns (exit code, output) and logs the output. Never
        waits past the budget: a command still running then is killed (exit code None)."""
        process, output = launched
        timeout = max(1.0, min(timeout or self.left(), self.left()))
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        output.seek(0)
        text = output.read() + (
            f"\n(killed after {timeout:.0f} s: its share of the budget ran out)" if code is None else ""
        )
        self.log_file.write(text.rstrip() + "\n")
        self.log(f"exit code {code}: {' '.join(process.args[1:3])}")
        return code, text

    def run(self, command, timeout=None, env=None):
        """`launch` then `finish`."""
        return self.finish(self.launch(command, env), timeout)

    def stage(self, name, estimate, results, function):
        """Runs `function()` (a dict of results) unless `estimate` seconds are no longer left."""
        began = time.monotonic()
        if self.left() < estimate:
            message = f"skipped: {self.left():.0f} s left of the budget, the stage needs about {estimate} s"
            self.log(f"stage {name}: {message}")
            results[name].update(status="skipped", message=message)
            return
        self.log(f"stage {name}")
        try:
            results[name].update(function())
            results[name]["status"] = results[name]["status"] or "ok"
        except Exception as e:  # noqa: BLE001 - one stage's failure must not cost the others.
            results[name].update(status="failed", message=f"{type(e).__name__}: {e}")
            self.log(f"stage {name} failed: {type(e).__name__}: {e}")
        results[name]["seconds"] = round(time.monotonic() - began, 1)


def last_json(output: str) -> dict:
    """The JSON object on the last line of a benchmark's output that holds one."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def pytest_counts(code, output) -> dict:
    """pytest's closing line ("3 passed, 1 skipped in 9.1s") as counts."""
    closing = next(
        (
            line
            for line in reversed(output.splitlines())
            if re.search(r"\d+ (passed|failed|error)", line) and " in " in line
        ),
        "",
    )
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", closing)}
    return {
        "exit_code": code,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "errors": counts.get("error", 0),
        "summary": closing.strip("= "),
    }


def peak_tflops(device_kind: str):
    """The dense bf16 peak of `device_kind` (e.g. "NVIDIA H200"), or None if unknown."""
    for name, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"\b{name}\b", device_kind):
            return tflops
    return None


def empty_results(args, sizes):
    return {
        "date": datetime.date.today().isoformat(),
        "dry_run": args.dry_run,
        "budget_seconds": sizes["budget"] if args.budget is None else args.budget,
        "python": sys.version.split()[0],
        "jax_version": None,
        "jaxlib_version": None,
        "backend": None,
        "device_kind": None,
        "device_count": None,
        "setup": {
            "status": None,
            "wheels_installed": None,
            "data_dir": None,
            "train_examples": None,
            "test_examples": None,
        },
        "newest_jax": {"status": None, "cpu_tests": None, "gpu_tests": None},
        "speed": {
            "status": None,
            "float32": None,
            "bfloat16": None,
            "bfloat16_sharded": None,
            "sharded_over_pmap_bfloat16": None,
            "torch_bfloat16_images_per_sec": None,
            "torch_version": None,
            "jax_over_torch_bfloat16": None,
            "peak_bf16_tflops": None,
            "mfu_float32": None,
            "mfu_bfloat16": None,
        },
        "time_to_accuracy": {
            "status": None,
            "epochs": None,
            "test_accuracy": None,
            "wall_seconds": None,
            "compile_seconds": None,
            "wall_seconds_without_compilation": None,
            "seconds_to_accuracy": None,
            "airbench94_a100_seconds": AIRBENCH94_A100_SECONDS,
        },
        "total_seconds": None,
    }


def setup_stage(check, args, sizes, data_dir, background):
    """Installs the carried wheels, starts the CPU test tier in the background (it shares no
    device with what follows), then builds the data set."""
    result = {"wheels_installed": 0}
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl"))) if args.wheels else []
    if wheels and sys.version_info[:2] != WHEELS_PYTHON:  # A dry run elsewhere than a rehearsal.
        result["message"] = f"{len(wheels)} wheels in {args.wheels} are for Python 3.12, not this one: not installed"
    elif wheels:
        target = os.path.join(tempfile.gettempdir(), "device_check_site")
        code, output = check.run(
            [
                PYTHON,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                target,
                *wheels,
            ],
            timeout=120,
        )
        if code != 0:
            raise RuntimeError(f"installing the wheels failed: {output.strip().splitlines()[-1:]}")
        check.env["PYTHONPATH"] = os.pathsep.join(p for p in (target, check.env.get("PYTHONPATH")) if p)
        result["wheels_installed"] = len(wheels)
    real = bool(args.archive) and os.path.exists(args.archive)
    if real:
        check.env["CIFAR10_ARCHIVE"] = os.path.abspath(args.archive)  # The tests build their data sets from it too.
    elif not args.dry_run:
        raise RuntimeError(f"no CIFAR-10 archive at {args.archive}: the speed and accuracy stages need the real data")
    xdist = ["-n", "8"] if _has_module("xdist") and not args.dry_run else []
    background["cpu_tests"] = check.launch(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, *sizes["cpu_tests"]],
        env=dict(check.env, JAX_PLATFORMS="cpu"),
    )
    source = ["--archive", args.archive] if real else ["--synthetic"]
    code, output = check.run([PYTHON, "-m", "resnet_jax.tfds_writer", data_dir, *source, *sizes["data"]], timeout=240)
    if code != 0:
        raise RuntimeError(f"building the data set failed: {output.strip().splitlines()[-1:]}")
    counts = dict(re.findall(r"(train|test)=(\d+)", output))
    result.update(
        data_dir=data_dir, real_data=real, train_examples=int(counts["train"]), test_examples=int(counts["test"])
    )
    return result


def newest_jax_stage(check, sizes, gpu_platform, background):
    """The model and train-step tests on the GPU, then the CPU test tier's results (8 CPU devices)."""
    # Not preallocating: the tests' run.py subprocesses share the GPU with the pytest process.
    gpu_env = dict(check.env, JAX_PLATFORMS=gpu_platform, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    code, output = check.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sizes.get("gpu_tests", GPU_TESTS)],
        timeout=sizes["gpu_tests_timeout"],
        env=gpu_env,
    )
    result = {"gpu_tests": pytest_counts(code, output)}
    if "cpu_tests" not in background:
        raise RuntimeError("the CPU tests were not started: the setup stage failed")
    # The speed stage must not share the CPU with them: they finish, or stop here.
    code, output = check.finish(background.pop("cpu_tests"), timeout=max(10.0, check.left() - sizes["after_tests"]))
    result["cpu_tests"] = pytest_counts(code, output)
    result["status"] = "ok" if all(r["exit_code"] == 0 for r in result.values()) else "failed"
    return result


def speed_stage(check, sizes, device_kind, device_count):
    """throughput.py in float32 and bfloat16 (and bfloat16 under the sharded layout), torch_reference.py
    in bfloat16, the ratios and MFU."""
    peak = peak_tflops(device_kind)
    result = {"peak_bf16_tflops": peak}
    for key, dtype, layout in (("float32", "float32", "pmap"), ("bfloat16", "bfloat16", "pmap"),
                               ("bfloat16_sharded", "bfloat16", "sharded")):  # fmt: skip
        code, output = check.run(
            [
                PYTHON,
                os.path.join(HERE, "throughput.py"),
                *sizes["throughput"],
                "--dtype",
                dtype,
                "--parallel",
                layout,
                "--no-breakdown",
                "--json",
            ],
            timeout=240,
        )
        if code != 0:
            raise RuntimeError(
                f"throughput.py --dtype {dtype} --parallel {layout} failed: {output.strip().splitlines()[-1:]}"
            )
        measured = last_json(output)
        result[key] = measured
        if peak and measured.get("train_tflops_per_sec") and layout == "pmap":
            result[f"mfu_{dtype}"] = round(measured["train_tflops_per_sec"] / (peak * device_count), 4)
    sharded, pmap = (result[k]["train_images_per_sec"] for k in ("bfloat16_sharded", "bfloat16"))
    result["sharded_over_pmap_bfloat16"] = round(sharded / pmap, 3)
    if not _has_module("torch"):
        result["message"] = "torch is not installed: no PyTorch reference"
        return result
    code, output = check.run(
        [PYTHON, os.path.join(HERE, "torch_reference.py"), *sizes["torch"], "--dtype", "bfloat16", "--json"],
        timeout=240,
    )
    if code != 0:
        result["message"] = f"torch_reference.py failed: {output.strip().splitlines()[-1:]}"
        return result
    torch_result = last_json(output)
    result["torch_version"] = torch_result["torch_version"]
    result["torch_bfloat16_images_per_sec"] = torch_result["train_images_per_sec"]
    result["jax_over_torch_bfloat16"] = round(
        result["bfloat16"]["train_images_per_sec"] / torch_result["train_images_per_sec"], 3
    )
    return result


def time_to_accuracy_stage(check, train_args, data_dir):
    """run.py on the real data; accuracy and wall time from its metrics.jsonl."""
    workdir = os.path.join(tempfile.gettempdir(), "device_check_run")
    shutil.rmtree(workdir, ignore_errors=True)
    began = time.monotonic()
    code, output = check.run(
        [
            PYTHON,
            "run.py",
            *train_args,
            "--workdir",
            workdir,
            f"--config.data.data_dir={data_dir}",
            "--config.data.download=False",
        ]
    )
    wall = time.monotonic() - began
    metrics = os.path.join(workdir, "metrics.jsonl")
    lines = open(metrics).read().splitlines() if os.path.exists(metrics) else []
    records = [json.loads(line) for line in lines if line.endswith("}")]  # A killed run may leave a torn line.
    tests = [r for r in records if r["split"] == "test"]
    if not tests:
        raise RuntimeError(f"run.py exited {code} before its first evaluation: {output.strip().splitlines()[-1:]}")
    compile_seconds = next((r["compile_seconds"] for r in records if "compile_seconds" in r), 0.0)
    # The first evaluation compiles the eval step: its extra time over a typical evaluation.
    eval_times = [r["eval_seconds"] for r in tests]
    eval_compile = max(0.0, eval_times[0] - statistics.median(eval_times[1:])) if len(eval_times) > 1 else 0.0
    training = tests[-1]["elapsed_seconds"]
    return {
        "status": "ok" if code == 0 else "failed",
        "exit_code": code,
        "epochs": tests[-1]["epoch"],
        "test_accuracy": tests[-1]["accuracy"],
        "best_test_accuracy": max(r["accuracy"] for r in tests),
        "process_wall_seconds": round(wall, 1),
        "wall_seconds": round(training, 1),
        "compile_seconds": round(compile_seconds + eval_compile, 1),
        "wall_seconds_without_compilation": round(training - compile_seconds - eval_compile, 1),
        "seconds_to_accuracy": {
            str(mark): next(
                (
                    round(r["elapsed_seconds"] - compile_seconds - eval_compile, 1)
                    for r in tests
                    if r["accuracy"] >= mark
                ),
                None,
            )
            for mark in ACCURACY_MARKS
        },
        "curve": [[round(r["epoch"], 2), round(r["accuracy"], 4)] for r in tests],
    }


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def platform_facts(check, gpu_platform):
    """Versions, backend and devices, read in a subprocess with the installed wheels in reach."""
    code, output = check.run(
        [
            PYTHON,
            "-c",
            "import json, jax, jaxlib; d = jax.devices(); print(json.dumps(dict("
            "jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, backend=jax.default_backend(), "
            "device_kind=d[0].device_kind, device_count=len(d))))",
        ],
        timeout=120,
        env=dict(check.env, JAX_PLATFORMS=gpu_platform) if gpu_platform else None,
    )
    return last_json(output) if code == 0 else {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for device_check.json and device_check.log")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of wheels to install first")
    parser.add_argument(
        "--archive",
        default=os.path.join(ROOT, ".carry", "cifar10_jpeg.tar.xz"),
        help="CIFAR-10 JPEG archive to build the data set from",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default: 480; dry run 300)")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes on this machine's CPU")
    parser.add_argument(
        "--real-tests", action="store_true", help="with --dry-run: the real check's test selections (the rehearsal)"
    )
    args = parser.parse_args(argv)

    sizes = DRY if args.dry_run else REAL
    if args.dry_run and args.real_tests:
        # The GPU stage's tests, run on a CPU, take minutes where a GPU takes the real check's 150 s.
        sizes = {key: value for key, value in DRY.items() if key != "gpu_tests"}
        sizes.update(cpu_tests=REAL["cpu_tests"], gpu_tests_timeout=900)
    check = Check(args.out, sizes["budget"] if args.budget is None else args.budget, args.dry_run)
    if args.dry_run:  # Several devices, so that the pmapped paths run as on a machine with several GPUs.
        check.env["XLA_FLAGS"] = (check.env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    gpu_platform = "" if args.dry_run else "cuda"  # The dry run's "GPU" is the default backend.
    results = empty_results(args, sizes)
    data_dir = os.path.join(tempfile.gettempdir(), "device_check_data")
    shutil.rmtree(data_dir, ignore_errors=True)
    estimates = sizes["estimates"]

    def write():
        results["total_seconds"] = round(time.monotonic() - check.start, 1)
        with open(os.path.join(args.out, "device_check.json"), "w") as f:
            json.dump(results, f, indent=2)

    background = {}
    check.stage("setup", estimates["setup"], results, lambda: setup_stage(check, args, sizes, data_dir, background))
    results.update(platform_facts(check, gpu_platform))
    check.log(f"{results['device_kind']} x {results['device_count']}, jax {results['jax_version']}")
    write()
    check.stage(
        "newest_jax", estimates["newest_jax"], results, lambda: newest_jax_stage(check, sizes, gpu_platform, background)
    )
    for launched in background.values():  # Not waited for (the stage was skipped): stop them.
        launched[0].kill()
    write()
    check.stage(
        "speed",
        estimates["speed"],
        results,
        lambda: speed_stage(check, sizes, results["device_kind"] or "", results["device_count"] or 1),
    )
    write()
    if results["setup"]["status"] == "ok":
        train_args, estimate = sizes["train"], estimates["time_to_accuracy"]
        check.stage("time_to_accuracy", estimate, results, lambda: time_to_accuracy_stage(check, train_args, data_dir))
    else:
        results["time_to_accuracy"].update(status="skipped", message="no data set: the setup stage did not finish")
    write()
    check.log(f"wrote {os.path.join(args.out, 'device_check.json')} in {results['total_seconds']} s")


if __name__ == "__main__":
    main()
