"""JAX against PyTorch training speed, the two run alternately in fresh processes.

throughput.py's train step (augmentation included unless --no-augment) and torch_reference.py's
(channels_last, a fixed random batch) run in turn, JAX PyTorch JAX ..., so that the machine's drift
falls on both. Prints each round's images/s, then per JAX side the median JAX/PyTorch ratio and its
spread (min_ratio, max_ratio). Each --jax-python (e.g. venvs with two jax releases) runs a JAX side;
median_relative_to_first: its images/s over the first one's.

    python benchmarks/compare.py --model resnet18 --stem cifar --batch-size 128 --dtype float32 --pairs 5 [--json]
    python benchmarks/compare.py --pairs 3 --jax-python .venv/bin/python --jax-python NEWEST_VENV/bin/python
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(command):
    """The JSON object on the last line of `command`'s stdout."""
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args):
    """Runs the pairs; returns their images/s, the ratios and their summary."""
    common = f"--model {args.model} --stem {args.stem} --batch-size {args.batch_size} --dtype {args.dtype}"
    common = f"{common} --steps {args.steps} --repeats {args.repeats} --json".split()
    jax_flags = ["--train-only"] + (["--no-augment"] if args.no_augment else [])
    jax_commands = [[python, os.path.join(HERE, "throughput.py"), *common, *jax_flags] for python in args.jax_python]
    torch_command = [sys.executable, os.path.join(HERE, "torch_reference.py"), *common, "--device", "cpu"]
    version = "import jax, json; print(json.dumps(jax.__version__))"
    versions = [run_json([python, "-c", version]) for python in args.jax_python]
    rounds = []
    for i in range(args.pairs):
        jax_rates = [run_json(command)["train_images_per_sec"] for command in jax_commands]
        torch_rate = run_json(torch_command)["train_images_per_sec"]
        rounds.append({"jax": jax_rates, "pytorch": torch_rate, "ratio": [round(r / torch_rate, 3) for r in jax_rates]})
        if not args.json:
            sides = "  ".join(f"JAX {v} {r:8.1f}" for v, r in zip(versions, jax_rates))
            print(f"round {i + 1}: {sides}  PyTorch {torch_rate:8.1f} images/s", flush=True)
    per_jax = []
    for j, (python, version) in enumerate(zip(args.jax_python, versions)):
        ratios = [r["ratio"][j] for r in rounds]
        relative = round(statistics.median(r["jax"][j] / r["jax"][0] for r in rounds), 3)
        spread = dict(median_ratio=round(statistics.median(ratios), 3), min_ratio=min(ratios), max_ratio=max(ratios))
        per_jax.append({"python": python, "jax": version, **spread, "median_relative_to_first": relative})
    settings = {k: getattr(args, k) for k in ("model", "stem", "batch_size", "dtype", "steps", "repeats")}
    first = {k: per_jax[0][k] for k in ("median_ratio", "min_ratio", "max_ratio")}
    return {**settings, "augment": not args.no_augment, "rounds": rounds, **first, "per_jax": per_jax}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "resnet34"))
    parser.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat, on both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per run; each run reports their median")
    parser.add_argument("--no-augment", action="store_true", help="leave augmentation out of the JAX step")
    parser.add_argument(
        "--jax-python", action="append", help="an interpreter for the JAX side (repeatable; default: this one)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    args.jax_python = args.jax_python or [sys.executable]
    result = compare(args)
    if not args.json:
        for side in result["per_jax"]:
            print(
                f"JAX {side['jax']}/PyTorch: median {side['median_ratio']:.3f},"
                f" spread {side['min_ratio']:.3f}-{side['max_ratio']:.3f};"
                f" relative to JAX {result['per_jax'][0]['jax']}: {side['median_relative_to_first']:.3f} "
                f"over {args.pairs} rounds ({args.model}, {args.stem} stem, batch {args.batch_size}, {args.dtype})"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
