"""Training and evaluation throughput of the trainer's own parallel steps, on synthetic data.

Runs `train.Setup`'s parallel train step (augmentation included) and eval step, as run.py does and
under its XLA flags, on every local device, with --num-train random uint8 images in memory:

* train_images_per_sec, eval_images_per_sec: the median over --repeats timings of --steps steps, the
  train step fed by `Setup.train_batches` as in training; compile_seconds: the first train step;
* input_wait_share: (t_fed - t_resident) / t_fed against steps on one batch kept on the devices;
  input_leaves_devices_idle: whether it exceeds INPUT_WAIT_TOLERANCE;
* train_flops_per_step (XLA's cost analysis), train_tflops_per_sec (MFU: divide by the devices' peak);
* augmentation_share: (t_aug - t_noaug) / t_aug against the step compiled with data.augment=False;
* peak_host_memory_mb: ru_maxrss (with --train-only, what a training run holds); device_peak_memory_mb:
  from device.memory_stats(), None where the backend reports none (the CPU);
* memory_breakdown_mb: the uint8 data, one train state, and the compiled train and eval steps'
  scratch (`memory_analysis().temp_size_in_bytes`: mostly activations kept for the backward pass).

    python benchmarks/throughput.py --model resnet18 --stem cifar --batch-size 128 [--dtype bfloat16] [--json]
    python benchmarks/throughput.py --config configs/resnet18_mix.py --json
"""

import argparse
import json
import os
import resource
import runpy
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from resnet_jax import models, parallel, train, xla_flags  # noqa: E402
from resnet_jax.data import pipeline  # noqa: E402
from resnet_jax.data.dataset import Dataset  # noqa: E402

CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000
INPUT_WAIT_TOLERANCE = 0.03  # fed steps this much slower than resident ones: the input side stalls the devices


def make_config(args):
    """The config to benchmark: `--config` (or the default), overridden by the explicit flags."""
    config = runpy.run_path(args.config)["get_config"]() if args.config else default.get_config()
    for field, value in (("name", args.model), ("stem", args.stem), ("dtype", args.dtype)):
        if value is not None:
            config.model[field] = value
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    if args.no_augment:
        config.data.augment = False
    if args.parallel is not None:
        config.parallel = args.parallel
    config.eval_batch_size = args.eval_batch_size or config.batch_size
    return config


def synthetic_dataset(num_train, num_test, num_classes=10, seed=0):
    """A CIFAR-shaped `Dataset` of random uint8 images and labels."""
    rng, splits = np.random.default_rng(seed), {}
    for split, n in (("train", num_train), ("test", num_test)):
        splits[f"{split}_images"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        splits[f"{split}_labels"] = rng.integers(0, num_classes, n, dtype=np.int32)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 73.9, np.float32)
    return Dataset(name="synthetic", class_names=tuple(map(str, range(num_classes))), **splits, mean=mean, std=std)


class TrainLoop:
    """The parallel train step and its replicated state, fed as `loop.train_and_evaluate` feeds it, or
    with one batch kept on the devices (`resident`): the step alone, with no input work at all."""

    def __init__(self, setup, devices):
        self.setup, self.devices = setup, devices
        self.step_fn = setup.parallel_train_step(devices)
        self.state = setup.layout.replicate(setup.fresh_state, devices)
        self.batches = setup.train_batches(0, 2**31 - 1, devices)
        self.resident = next(self.batches)

    def run(self, steps, resident=False):
        """Seconds for the next `steps` train steps, until their results are ready."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state = self.step_fn(self.state, self.resident if resident else next(self.batches))
        jax.block_until_ready(self.state)
        return time.perf_counter() - start


def eval_batch(setup, devices):
    """The first test batch, as evaluation builds it."""
    dataset = setup.dataset
    batches = pipeline.eval_batches(dataset.test_images, dataset.test_labels, batch_size=setup.config.eval_batch_size)
    return setup.layout.place_batch(next(batches), devices)


def eval_images_per_sec(setup, devices, state, steps, repeats):
    """Median eval images/s of `parallel_eval_step` over `repeats` timings of `steps` batches."""
    step_fn, batch = setup.parallel_eval_step(devices), eval_batch(setup, devices)
    jax.block_until_ready(step_fn(state, batch))  # Compiles.
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([step_fn(state, batch) for _ in range(steps)])
        rates.append(steps * setup.config.eval_batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def memory_breakdown_mb(loop):
    """The parts of a training run's host memory that this process can account for, in MB."""
    setup, devices, mb = loop.setup, loop.devices, lambda n: round(n / 2**20, 1)  # noqa: E731
    data = setup.dataset.train_images, setup.dataset.train_labels, setup.dataset.test_images, setup.dataset.test_labels
    temp = lambda step_fn, *args: step_fn.lower(*args).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    return {
        "data": mb(sum(a.nbytes for a in data)),
        "train_state": mb(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(setup.fresh_state))),
        "train_step_scratch": mb(temp(setup.parallel_train_step(devices), loop.state, loop.resident)),
        "eval_step_scratch": mb(temp(setup.parallel_eval_step(devices), loop.state, eval_batch(setup, devices))),
    }


def train_step_flops(setup, devices) -> float:
    """FLOPs of one train step on one device, from XLA's cost analysis. pmap's lowering hides the mapped
    body from it (a fifth of a ResNet-18 step's FLOPs), so the step is vmapped over a one-element axis."""
    config, dataset = setup.config, setup.dataset
    state = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], setup.fresh_state)
    rows, batch_size = (dataset.train_images, dataset.train_labels), config.batch_size // len(devices)
    batch = pipeline.train_batch(*rows, 0, batch_size=batch_size, seed=config.seed, mix=train.mixes(config))
    batch = jax.tree_util.tree_map(lambda x: x[None], batch)  # the one-element axis
    lowered = jax.jit(jax.vmap(setup.configured_train_step(), axis_name=parallel.AXIS)).lower(state, batch)
    return float(lowered.cost_analysis()["flops"])


def benchmark(config, dataset, devices, steps, repeats, train_only=False, breakdown=True):
    """The measurements described in the module docstring, as a dict."""
    setup = train.Setup(config, dataset)
    loop = TrainLoop(setup, devices)
    result = {"compile_seconds": round(loop.run(1), 2)}
    plain = None
    if config.data.augment and not train_only and breakdown:
        plain_config = config.copy_and_resolve_references()
        plain_config.data.augment = False
        plain = TrainLoop(train.Setup(plain_config, dataset), devices)
        plain.run(1)
    seconds, resident_seconds, plain_seconds = [], [], []
    for _ in range(repeats):  # Alternating, so that all see the same machine state.
        seconds.append(loop.run(steps))
        resident_seconds.append(loop.run(steps, resident=True))
        if plain:
            plain_seconds.append(plain.run(steps))
    t_fed, t_resident = statistics.median(seconds), statistics.median(resident_seconds)
    result["train_images_per_sec"] = round(steps * config.batch_size / t_fed, 1)
    result["train_flops_per_step"] = train_step_flops(setup, devices) * len(devices)
    result["train_tflops_per_sec"] = round(result["train_flops_per_step"] * steps / t_fed / 1e12, 3)
    # The devices wait for input only if fed steps are slower than steps on a batch already there.
    result["input_wait_share"] = round(max(0.0, (t_fed - t_resident) / t_fed), 4)
    result["input_leaves_devices_idle"] = result["input_wait_share"] > INPUT_WAIT_TOLERANCE
    if plain:
        result["augmentation_share"] = round((t_fed - statistics.median(plain_seconds)) / t_fed, 4)
    if not train_only:
        result["eval_images_per_sec"] = round(eval_images_per_sec(setup, devices, loop.state, steps, repeats), 1)
    result["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    peaks = [p for d in devices if (p := (d.memory_stats() or {}).get("peak_bytes_in_use")) is not None]
    result["device_peak_memory_mb"] = round(max(peaks) / 2**20, 1) if peaks else None  # None: the backend has none
    if not train_only and breakdown:
        result["memory_breakdown_mb"] = memory_breakdown_mb(loop)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a configs/*.py file to take the model, dtype and batch from")
    parser.add_argument("--model", default=None, choices=sorted(models.MODELS), help="default: the config's (resnet18)")
    parser.add_argument("--stem", default=None, choices=("cifar", "imagenet"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=None, help="global batch; default: the config's")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: the train batch")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-devices", type=int, default=None, help="the first N local devices; default: all")
    parser.add_argument("--parallel", choices=sorted(parallel.LAYOUTS), help="device layout; default: the config's")
    parser.add_argument("--num-train", type=int, default=CIFAR10_TRAIN, help="synthetic train images held in memory")
    parser.add_argument("--num-test", type=int, default=CIFAR10_TEST)
    parser.add_argument("--no-augment", action="store_true", help="train without the on-device augmentation")
    parser.add_argument("--train-only", action="store_true", help="skip the eval and augmentation-share timings")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip augmentation share and memory breakdown (2 compiles)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    config = make_config(args)
    xla_flags.set_cpu_defaults(config.model.dtype)  # The XLA flags run.py trains with, before jax's backend starts.
    devices = jax.local_devices()[: args.num_devices]
    for flag, value in (("--batch-size", config.batch_size), ("--eval-batch-size", config.eval_batch_size)):
        if value % len(devices):
            parser.error(f"{flag} {value} is not divisible by the {len(devices)} devices")
    if args.num_train < config.batch_size or args.num_test < 1:
        parser.error("--num-train must hold at least one batch and --num-test at least one image")
    dataset = synthetic_dataset(args.num_train, args.num_test)
    result = {"framework": "jax", "jax_version": jax.__version__, "backend": jax.default_backend()}
    result.update(device_kind=devices[0].device_kind, devices=len(devices), xla_flags=os.environ.get("XLA_FLAGS", ""))
    stem = config.model.stem if config.model.name in models.STEM_MODELS else None
    result.update(model=config.model.name, stem=stem, batch_size=config.batch_size)
    result.update(eval_batch_size=config.eval_batch_size, dtype=config.model.dtype, parallel=config.parallel)
    result.update(augment=config.data.augment, mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha)
    result.update(steps=args.steps, repeats=args.repeats, num_train=args.num_train)
    result.update(benchmark(config, dataset, devices, args.steps, args.repeats, args.train_only, not args.no_breakdown))
    if not args.json:
        print(
            f"{result['model']} {result['dtype']} batch {result['batch_size']} ({result['parallel']}) "
            f"on {result['devices']} {result['backend']} device(s): {result['train_images_per_sec']} train images/s, "
            f"{result.get('eval_images_per_sec')} eval images/s, compiled in {result['compile_seconds']} s"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
