"""Speed and time-to-accuracy of this trainer on a GPU or TPU VM, in one command: setup (wheels,
data), tests on the accelerator, speed (throughput.py, torch_reference.py), then airbench94 and
configs/resnet18.py's full recipe trained to accuracy. Each stage is skipped, saying why, when what
is left of --budget would not hold it. Writes DIR/device_check.json (each stage's results, status
and seconds) and DIR/device_check.log (every command and its output); exits 1 if a stage failed or
there is no accelerator. What each measures: docs/device-check.md.

    python benchmarks/device_check.py --out DIR [--budget SECONDS] [--data-dir DIR | --archive FILE] [--wheels DIR]
    python benchmarks/device_check.py --out DIR --dry-run    # every stage at tiny sizes, on a CPU
"""

import argparse
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Dense bf16 peak of one device, TFLOP/s (vendor datasheets; NVIDIA's SXM parts): MFU's denominator.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L4": 121.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}  # fmt: skip
ACCURACY_MARKS = (0.90, 0.93, 0.94, 0.95)
LOAD_DATA = (  # prepares the data set where needed (as run.py does) and counts it
    "import sys; from configs import default; from resnet_jax.data import registry; c = default.get_config().data; "
    "c.data_dir = sys.argv[1] or None; c.archive = sys.argv[2]; d = registry.load_dataset(c); "
    "print(f'train={len(d.train_labels)} test={len(d.test_labels)}')"
)
PLATFORM = (
    "import json, jax, jaxlib; d = jax.devices(); print(json.dumps(dict(jax_version=jax.__version__, "
    "jaxlib_version=jaxlib.__version__, backend=jax.default_backend(), device_kind=d[0].device_kind, "
    "device_count=len(d))))"
)
GPU_TESTS = "not slow and not multidevice and not multiprocess and not zoo"  # by marker: pyproject.toml

SPEED = "--model resnet18 --stem cifar --batch-size 512 --steps 20 --repeats 3".split()
REAL = {
    "budget": 3600,
    "data": [],
    "tests": ["tests/test_models.py", "tests/test_train.py", "tests/test_loop.py", "-m", GPU_TESTS],
    "throughput": SPEED,
    "torch": SPEED,
    "airbench94": ("configs/airbench94.py", {"model.dtype": "bfloat16", "eval_batch_size": 1000}),
    "resnet18": ("configs/resnet18.py", {}),
    "estimates": {"setup": 120, "tests": 300, "speed": 240, "airbench94": 120},
}
# The dry run's tiny stand-ins: every stage in about a minute on a CPU.
DRY = {
    "budget": 420,  # several times what it takes on a quiet 2-core CPU: room for a loaded one
    "data": "--train 640 --test 100".split(),
    "tests": ["tests/test_models.py::test_batch_norm_statistics_update_in_train_mode_only"],
    "throughput": "--model resnet8 --batch-size 16 --eval-batch-size 40 --steps 2 --repeats 1 --num-train 512 "
    "--num-test 40".split(),
    "torch": "--model resnet18 --batch-size 8 --steps 1 --repeats 1 --warmup 1".split(),
    "airbench94": ("configs/smoke.py", {"num_train_steps": 20, "eval_every_epochs": 1, "log_every_steps": 5}),
    "resnet18": ("configs/resnet18.py", {"model.name": "resnet8", "batch_size": 16, "num_epochs": 0.5}),
    "estimates": {"setup": 10, "tests": 15, "speed": 30, "airbench94": 20},
}


class Check:
    """The budget, the log, and the results, written to OUT/device_check.json after each stage."""

    def __init__(self, out, budget):
        self.start, self.budget, self.out = time.monotonic(), budget, out
        os.makedirs(out, exist_ok=True)
        self.log_file = open(os.path.join(out, "device_check.log"), "w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.results = {}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        print(line, file=self.log_file, flush=True)

    def write(self) -> None:
        self.results["total_seconds"] = round(time.monotonic() - self.start, 1)
        with open(os.path.join(self.out, "device_check.json"), "w") as f:
            json.dump(self.results, f, indent=2)

    def run(self, command, timeout=None, env=None):
        """(exit code, output) of `command`, run from the repository root and logged; killed with its
        children when the budget runs out (code None)."""
        self.log("$ " + " ".join(command))
        timeout = max(1.0, min(timeout or self.left(), self.left()))
        with tempfile.TemporaryFile("w+") as output:
            process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=output, stderr=output,
                                       text=True, start_new_session=True)  # fmt: skip
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:  # A timeout, or Ctrl-C: nothing is left running on the accelerator.
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            output.seek(0)
            text = output.read() + (f"\n(killed after {timeout:.0f} s: the budget ran out)" if code is None else "")
        self.log_file.write(text.rstrip() + "\n")
        self.log(f"exit code {code}")
        return code, text

    def stage(self, name, estimate, function, requires=()):
        """Runs `function()` (a dict of results) unless a stage it `requires` is not ok, or what is left
        of the budget is under `estimate` seconds (a number, or a function giving one)."""
        began, missing = time.monotonic(), [s for s in requires if self.results.get(s, {}).get("status") != "ok"]
        estimate = 0 if missing else estimate() if callable(estimate) else estimate
        if missing:
            result = {"status": "skipped", "message": f"needs the {' and '.join(missing)} stage"}
        elif self.left() < estimate:
            message = f"{self.left():.0f} s left of the budget; the stage needs about {estimate:.0f} s"
            result = {"status": "skipped", "message": message}
        else:
            self.log(f"stage {name}")
            try:
                result = {"status": "ok", **function()}
            except Exception as e:  # noqa: BLE001 - one stage's failure must not cost the others.
                result = {"status": "failed", "message": f"{type(e).__name__}: {e}"}
            result.update(seconds=round(time.monotonic() - began, 1), estimated_seconds=round(estimate, 1))
        self.results[name] = result
        self.log(f"stage {name}: {result['status']} {result.get('message', '')}")
        self.write()


def last_json(output: str) -> dict:
    """The JSON object on the last line of a command's output that holds one."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def run_or_raise(check, command, timeout=None):
    code, output = check.run(command, timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} exited {code}: {output.strip()[-300:]}")
    return output


def installed(wheel: str) -> bool:
    """Whether this Python has the wheel's package (this project counts: it runs from its checkout)."""
    name = os.path.basename(wheel).split("-")[0]
    try:
        return name.lower().replace("_", "-") == "resnet-jax" or bool(importlib.metadata.distribution(name))
    except importlib.metadata.PackageNotFoundError:
        return False


def setup_stage(check, args, sizes):
    """The missing wheels installed, then the data set prepared and counted."""
    wheels = [w for w in sorted(glob.glob(os.path.join(args.wheels or "", "*.whl"))) if not installed(w)]
    if wheels:
        target = os.path.join(check.out, "site")
        pip = [PYTHON, *"-m pip install -q --no-index --no-deps --no-compile --upgrade --target".split(), target]
        run_or_raise(check, [*pip, *wheels], 300)
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, (target, check.env.get("PYTHONPATH"))))
        sys.path.insert(0, target)  # for the recipe's config, read here
    archive = os.path.abspath(args.archive) if args.archive else ""
    data_dir = args.data_dir and os.path.abspath(args.data_dir)
    jpeg = archive and (os.path.isdir(archive) or archive.endswith(".tar.xz"))
    if jpeg:
        check.env["CIFAR10_ARCHIVE"] = archive  # The tests' data sets are made of its images too.
    if archive or args.dry_run:
        data_dir = os.path.join(check.out, "data")
        shutil.rmtree(data_dir, ignore_errors=True)
    if jpeg or args.dry_run:
        source = ["--archive", archive] if jpeg else ["--synthetic"]
        run_or_raise(check, [PYTHON, "-m", "resnet_jax.tfds_writer", data_dir, *source, *sizes["data"]], 600)
    output = run_or_raise(check, [PYTHON, "-c", LOAD_DATA, data_dir or "", "" if jpeg else archive], 900)
    counts = {f"{split}_examples": int(n) for split, n in re.findall(r"(train|test)=(\d+)", output)}
    return {"wheels_installed": len(wheels), "data_dir": data_dir, **counts}


def tests_stage(check, sizes, backend):
    """The tests of `sizes` on the accelerator, and pytest's counts."""
    # Not preallocating: the tests' run.py subprocesses share the device with the pytest process.
    env = dict(check.env, JAX_PLATFORMS=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    code, output = check.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sizes["tests"]], 900, env)
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"status": "ok" if code == 0 else "failed", "exit_code": code, "summary": summary.strip("= "), **counts}


def speed_stage(check, sizes, platform):
    """throughput.py in float32 and bfloat16 with MFU, then torch_reference.py in bfloat16 and the ratio."""
    kind = platform["device_kind"]  # e.g. "NVIDIA H200"
    result = {"peak_bf16_tflops": next((t for n, t in PEAK_BF16_TFLOPS.items() if re.search(rf"\b{n}\b", kind)), None)}
    for dtype in ("float32", "bfloat16"):
        throughput = [PYTHON, "benchmarks/throughput.py", *sizes["throughput"], "--dtype", dtype]
        result[dtype] = last_json(run_or_raise(check, [*throughput, "--no-breakdown", "--json"], 300))
        if result["peak_bf16_tflops"]:
            peak = result["peak_bf16_tflops"] * result[dtype]["devices"]
            result[f"mfu_{dtype}"] = round(result[dtype]["train_tflops_per_sec"] / peak, 4)
    if platform["backend"] == "tpu" or importlib.util.find_spec("torch") is None:
        why = "torch runs on CUDA GPUs" if platform["backend"] == "tpu" else "torch is not installed"
        return {**result, "message": f"no PyTorch reference: {why}"}
    reference = [PYTHON, "benchmarks/torch_reference.py", *sizes["torch"], "--dtype", "bfloat16", "--json"]
    torch = last_json(run_or_raise(check, reference, 300))
    ratio = round(result["bfloat16"]["train_images_per_sec"] / torch["train_images_per_sec"], 3)
    return {**result, "torch_bfloat16": torch, "jax_over_torch_bfloat16": ratio}


def recipe_seconds(config, speed, train_examples, test_examples):
    """Seconds `config` should train for at `speed` (throughput.py's figures at its dtype and batch):
    its epochs, its evaluations and two compilations, with a margin."""
    evaluations = math.ceil(config.num_epochs / config.eval_every_epochs)
    training = config.num_epochs * train_examples / speed["train_images_per_sec"]
    evaluating = evaluations * test_examples / speed["eval_images_per_sec"]
    # A quarter more for checkpoints and noise; 30 s for run.py's start (imports, loading the data).
    return 1.25 * (training + evaluating + 2 * speed["compile_seconds"]) + 30


def train_stage(check, name, sizes):
    """run.py with the config of `sizes[name]`; accuracy and wall time from its metrics.jsonl."""
    path, overrides = sizes[name]
    workdir = os.path.join(check.out, "runs", name)
    shutil.rmtree(workdir, ignore_errors=True)
    data_dir = check.results["setup"]["data_dir"]
    flags = [f"--config.{k}={v}" for k, v in {**overrides, "data.data_dir": data_dir}.items() if v is not None]
    code, output = check.run([PYTHON, "run.py", "--config", path, "--workdir", workdir, *flags])
    metrics = os.path.join(workdir, "metrics.jsonl")
    lines = open(metrics).read().splitlines() if os.path.exists(metrics) else []
    records = [json.loads(line) for line in lines if line.endswith("}")]  # A killed run may leave a torn line.
    tests = [r for r in records if r["split"] == "test"]
    if not tests:
        raise RuntimeError(f"run.py exited {code} before its first evaluation: {output.strip()[-300:]}")
    # The first evaluation compiles the eval step: its extra time over a typical evaluation counts as compilation.
    evals = [r["eval_seconds"] for r in tests]
    compile_seconds = next((r["compile_seconds"] for r in records if "compile_seconds" in r), 0.0)
    compile_seconds += max(0.0, evals[0] - statistics.median(evals[1:])) if len(evals) > 1 else 0.0
    marks = {
        str(m): next((round(r["elapsed_seconds"] - compile_seconds, 1) for r in tests if r["accuracy"] >= m), None)
        for m in ACCURACY_MARKS
    }
    last = tests[-1]
    result = {"status": "ok" if code == 0 else "failed", "exit_code": code, "epochs": last["epoch"]}
    result.update(test_accuracy=last["accuracy"], wall_seconds=round(last["elapsed_seconds"], 1))
    without = round(last["elapsed_seconds"] - compile_seconds, 1)
    result.update(compile_seconds=round(compile_seconds, 1), wall_seconds_without_compilation=without)
    return {**result, "seconds_to_accuracy": marks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for device_check.json, device_check.log and the runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 3600; dry run 420)")
    parser.add_argument("--data-dir", help="tfds data_dir holding (or to download) cifar10/3.0.2")
    parser.add_argument("--archive", help="CIFAR-10 as JPEG folders (.tar.xz or a folder) or cifar-10-binary.tar.gz")
    parser.add_argument("--wheels", help="a folder of wheels: those whose packages this Python lacks are installed")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes, on a CPU")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else REAL
    estimates = sizes["estimates"]
    check = Check(os.path.abspath(args.out), args.budget or sizes["budget"])
    if args.dry_run:  # Several devices, so that the pmapped paths run as on a machine with several accelerators.
        check.env["XLA_FLAGS"] = (check.env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    check.results.update(date=str(datetime.date.today()), dry_run=args.dry_run, budget_seconds=check.budget)
    check.stage("setup", estimates["setup"], lambda: setup_stage(check, args, sizes))
    code, output = check.run([PYTHON, "-c", PLATFORM], 120)
    platform = last_json(output) if code == 0 else {"backend": None, "device_kind": ""}
    check.results.update(platform)
    if platform["backend"] in (None, "cpu") and not args.dry_run:
        check.results["message"] = f"no GPU or TPU (jax's backend: {platform['backend']}); --dry-run runs on a CPU"
        check.write()
        sys.exit(check.results["message"])
    check.log(f"{platform['device_kind']} x {platform['device_count']}, jax {platform['jax_version']}")
    check.stage("tests", estimates["tests"], lambda: tests_stage(check, sizes, platform["backend"]))
    check.stage("speed", estimates["speed"], lambda: speed_stage(check, sizes, platform))
    check.stage("airbench94", estimates["airbench94"], lambda: train_stage(check, "airbench94", sizes), ("setup",))

    def recipe_estimate():
        path, overrides = sizes["resnet18"]
        sys.path.insert(0, ROOT)  # for the config's own imports
        config, setup = runpy.run_path(os.path.join(ROOT, path))["get_config"](), check.results["setup"]
        config.update_from_flattened_dict(overrides)
        speed = check.results["speed"][config.model.dtype]
        return recipe_seconds(config, speed, setup["train_examples"], setup["test_examples"])

    check.stage("resnet18", recipe_estimate, lambda: train_stage(check, "resnet18", sizes), ("setup", "speed"))
    check.log(f"wrote {os.path.join(check.out, 'device_check.json')}")
    return int(any(isinstance(r, dict) and r["status"] == "failed" for r in check.results.values()))


if __name__ == "__main__":
    sys.exit(main())
