"""Host-side speed of the input pipeline, in images/s.

Times what the training loop does on the host for every step: `pipeline.train_batch`
(the epoch's permutation, the gather of the batch's images and labels from the uint8
split held in memory), then `parallel.device_batches`, the host->device transfer of the
batch onto the local devices in the layout the train step takes (until `block_until_ready`).
Reports both rates: host_images_per_sec (batching alone) and images_per_sec (batching +
transfer), the medians over `--repeats` timings of `--steps` batches.

    python benchmarks/input_pipeline.py [--batch-size 512] [--num-train 50000] [--data-dir DIR] [--json]

Without --data-dir the split is `--num-train` random uint8 32x32x3 images (the size of
CIFAR-10's train split by default); with it, CIFAR-10 from tfds in DIR.
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

from configs import default  # noqa: E402
from resnet_jax import parallel  # noqa: E402
from resnet_jax.data import pipeline, registry  # noqa: E402


def load_train_split(data_dir, num_train, seed=0):
    """(uint8 images, int32 labels): CIFAR-10's train split from tfds in `data_dir`, or random ones."""
    if data_dir:
        config = default.get_config().data
        config.data_dir = data_dir
        config.download = False
        dataset = registry.load_dataset(config)
        return dataset.train_images, dataset.train_labels
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, num_train, dtype=np.int32)


def time_batches(images, labels, *, batch_size, devices, first_step, steps, transfer, layout="pmap"):
    """Seconds for `steps` consecutive train batches from `first_step`, sent to `devices` if `transfer`."""
    start = time.perf_counter()
    batches = pipeline.train_batches(
        images, labels, range(first_step, first_step + steps), batch_size=batch_size, seed=0
    )
    for batch in parallel.layout(layout).device_batches(batches, devices) if transfer else batches:
        jax.block_until_ready(batch)
    return time.perf_counter() - start


def benchmark(images, labels, *, batch_size, devices, steps, repeats, layout="pmap"):
    """Median host-only and host+transfer images/s; repeats alternate between the two."""
    rates = {"host_images_per_sec": [], "images_per_sec": []}
    for r in range(repeats + 1):  # The first round warms up (permutation cache, transfer path).
        for key, transfer in (("host_images_per_sec", False), ("images_per_sec", True)):
            seconds = time_batches(
                images,
                labels,
                batch_size=batch_size,
                devices=devices,
                first_step=r * steps,
                steps=steps,
                transfer=transfer,
                layout=layout,
            )
            if r:
                rates[key].append(steps * batch_size / seconds)
    return {key: round(statistics.median(values), 1) for key, values in rates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--num-train", type=int, default=50_000, help="synthetic train images (without --data-dir)")
    parser.add_argument("--data-dir", default=None, help="a tfds data_dir holding cifar10 (optional)")
    parser.add_argument("--steps", type=int, default=100, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", default="pmap", choices=sorted(parallel.LAYOUTS), help="the device layout")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()

    devices = jax.local_devices()
    if args.batch_size % len(devices):
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {len(devices)} devices")
    images, labels = load_train_split(args.data_dir, args.num_train)
    if len(images) < args.batch_size:
        parser.error(f"the split holds {len(images)} images, fewer than one batch of {args.batch_size}")
    result = {
        "backend": jax.default_backend(),
        "devices": len(devices),
        "batch_size": args.batch_size,
        "parallel": args.parallel,
        "num_train": len(images),
        "data": args.data_dir or "synthetic",
        "steps": args.steps,
        "repeats": args.repeats,
    }
    result.update(
        benchmark(
            images,
            labels,
            batch_size=args.batch_size,
            devices=devices,
            steps=args.steps,
            repeats=args.repeats,
            layout=args.parallel,
        )
    )
    if not args.json:
        print(
            f"batch {args.batch_size} from {len(images)} images: {result['host_images_per_sec']} images/s batched on "
            f"the host, {result['images_per_sec']} images/s"
            f" with the transfer to {len(devices)} {result['backend']} device(s)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
