"""JAX vs PyTorch training throughput, measured alternately in one invocation.

Runs benchmarks/throughput.py (the trainer's parallel JAX train step) and
benchmarks/torch_reference.py (the PyTorch reference, channels_last, its best thread
count) in turn, JAX PyTorch JAX PyTorch ..., each in a fresh subprocess so that they share
no threads, memory or caches, and prints each pair's JAX/PyTorch images/s ratio, the
median ratio and its spread (min-max). Alternating spreads any drift of the machine
(other load, clock) over both sides.

    python benchmarks/compare.py --model resnet18 --stem cifar --batch-size 128 --dtype float32 --pairs 5 [--json]

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
    """The (JAX, PyTorch) command lines for one pair."""
    common = [
        "--model",
        args.model,
        "--stem",
        args.stem,
        "--batch-size",
        str(args.batch_size),
        "--dtype",
        args.dtype,
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--json",
    ]
    jax_command = [sys.executable, os.path.join(HERE, "throughput.py"), *common, "--train-only"]
    if args.no_augment:
        jax_command.append("--no-augment")
    torch_command = [sys.executable, os.path.join(HERE, "torch_reference.py"), *common, "--device", "cpu"]
    return jax_command, torch_command


def compare(args):
    """Runs the pairs; returns their images/s, the ratios and their summary."""
    jax_command, torch_command = commands(args)
    pairs = []
    for i in range(args.pairs):
        jax_rate = run_json(jax_command)["train_images_per_sec"]
        torch_rate = run_json(torch_command)["train_images_per_sec"]
        pairs.append({"jax": jax_rate, "pytorch": torch_rate, "ratio": round(jax_rate / torch_rate, 3)})
        if not args.json:
            print(
                f"pair {i + 1}: JAX {jax_rate:8.1f}  PyTorch {torch_rate:8.1f} images/s "
                f" ratio {pairs[-1]['ratio']:.3f}",
                flush=True,
            )
    ratios = [p["ratio"] for p in pairs]
    return {
        "model": args.model,
        "stem": args.stem,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "augment": not args.no_augment,
        "steps": args.steps,
        "repeats": args.repeats,
        "pairs": pairs,
        "median_ratio": round(statistics.median(ratios), 3),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


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
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    result = compare(args)
    if not args.json:
        print(
            f"JAX/PyTorch: median {result['median_ratio']:.3f},"
            f" spread {result['min_ratio']:.3f}-{result['max_ratio']:.3f} "
            f"over {args.pairs} pairs ({args.model}, {args.stem} stem, batch {args.batch_size}, {args.dtype})"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
