"""JAX vs PyTorch training throughput, measured alternately in one invocation.

Runs benchmarks/throughput.py (the trainer's parallel JAX train step) and
benchmarks/torch_reference.py (the PyTorch reference, channels_last, its best thread
count) in turn, JAX PyTorch JAX PyTorch ..., each in a fresh subprocess so that they share
no threads, memory or caches, and prints each pair's JAX/PyTorch images/s ratio, the
median ratio and its spread (min-max). Alternating spreads any drift of the machine
(other load, clock) over both sides.

    python benchmarks/compare.py --model resnet18 --stem cifar --batch-size 128 --dtype float32 --pairs 5 [--json]

`--jax-python PYTHON` (repeatable) runs the JAX side under each of these interpreters in
turn within every round (JAX-a JAX-b PyTorch, ...): two virtual environments with two jax
releases, against the same PyTorch. It then also prints each one's speed relative to the
first, the median over rounds of their images/s ratio.

    python benchmarks/compare.py --pairs 3 --jax-python .venv/bin/python --jax-python NEWEST_VENV/bin/python

The JAX step includes the on-device augmentation (random crop + flip), as in training;
the PyTorch step trains on a fixed random batch. --no-augment leaves augmentation out
of the JAX step too.
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


def commands(args):
    """The JAX command lines (one per --jax-python) and the PyTorch one, for one round."""
    common = f"--model {args.model} --stem {args.stem} --batch-size {args.batch_size} --dtype {args.dtype}"
    common = [*f"{common} --steps {args.steps} --repeats {args.repeats} --json".split()]
    jax_flags = ["--train-only"] + (["--no-augment"] if args.no_augment else [])
    jax_commands = [[python, os.path.join(HERE, "throughput.py"), *common, *jax_flags] for python in args.jax_python]
    torch_command = [sys.executable, os.path.join(HERE, "torch_reference.py"), *common, "--device", "cpu"]
    return jax_commands, torch_command


def jax_version(python) -> str:
    done = subprocess.run([python, "-c", "import jax; print(jax.__version__)"], capture_output=True, text=True)
    return done.stdout.strip()


def compare(args):
    """Runs the pairs; returns their images/s, the ratios and their summary."""
    jax_commands, torch_command = commands(args)
    versions = [jax_version(python) for python in args.jax_python]
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
        relative = [r["jax"][j] / r["jax"][0] for r in rounds]
        per_jax.append(
            {
                "python": python,
                "jax": version,
                "median_ratio": round(statistics.median(ratios), 3),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "median_relative_to_first": round(statistics.median(relative), 3),
            }
        )
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
        "--jax-python", action="append", help="an interpreter to run the JAX side with (repeatable; default: this one)"
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
