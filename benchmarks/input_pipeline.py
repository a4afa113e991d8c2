"""Host-side speed of the input pipeline, in images/s.

Times what training does on the host each step: `pipeline.train_batch` (the epoch's permutation,
the gather from --num-train random uint8 32x32x3 images in memory; pixels do not matter), then
`parallel.device_batches`, the transfer onto the local devices (until `block_until_ready`).
host_images_per_sec: batching alone; images_per_sec: batching and transfer; each the median over
--repeats timings of --steps batches.

    python benchmarks/input_pipeline.py [--batch-size 512] [--num-train 50000] [--json]
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from resnet_jax import parallel  # noqa: E402
from resnet_jax.data import pipeline  # noqa: E402


def benchmark(images, labels, args, devices):
    """Median host-only and host+transfer images/s over --repeats timings of --steps consecutive batches."""
    rates = {"host_images_per_sec": [], "images_per_sec": []}
    for r in range(args.repeats + 1):  # The first round warms up (permutation cache, transfer path).
        for key, transfer in (("host_images_per_sec", False), ("images_per_sec", True)):  # alternately
            start = time.perf_counter()
            steps = range(r * args.steps, (r + 1) * args.steps)
            batches = pipeline.train_batches(images, labels, steps, batch_size=args.batch_size, seed=0)
            for batch in parallel.layout(args.parallel).device_batches(batches, devices) if transfer else batches:
                jax.block_until_ready(batch)
            if r:
                rates[key].append(args.steps * args.batch_size / (time.perf_counter() - start))
    return {key: round(statistics.median(values), 1) for key, values in rates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--num-train", type=int, default=50_000, help="random train images held in memory")
    parser.add_argument("--steps", type=int, default=100, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", default="pmap", choices=sorted(parallel.LAYOUTS), help="the device layout")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    devices = jax.local_devices()
    if args.batch_size % len(devices):
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {len(devices)} devices")
    if args.num_train < args.batch_size:
        parser.error(f"--num-train {args.num_train} is fewer than one batch of {args.batch_size}")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_train, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.num_train, dtype=np.int32)
    result = {"backend": jax.default_backend(), "devices": len(devices), "batch_size": args.batch_size}
    result.update(parallel=args.parallel, num_train=len(images), steps=args.steps, repeats=args.repeats)
    result.update(benchmark(images, labels, args, devices))
    if not args.json:
        print(
            f"batch {args.batch_size} from {len(images)} images: {result['host_images_per_sec']} images/s batched on "
            f"the host, {result['images_per_sec']} images/s with the transfer to {len(devices)} {result['backend']} "
            "device(s)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
