"""Training and evaluation throughput of the trainer's own parallel steps, on synthetic data.

Runs `train.Setup(...).parallel_train_step()` and `parallel_eval_step()` (the functions `run.py` trains and evaluates
with, on-device augmentation included, under the XLA flags run.py sets) on a synthetic uint8 data set of random
images (`--num-train` of them in memory, CIFAR-10's 50,000 by default), on every local device of the current
backend, and reports:

* train_images_per_sec: the median over `--repeats` timings of `--steps` train steps, after compilation; each step
  takes its batch from `Setup.train_batches` (host batching and a prefetched transfer), as the training loop does;
* eval_images_per_sec: the same for the eval step, on one test batch;
* compile_seconds: the first train step (tracing, compilation and one step);
* input_wait_share: (t_fed - t_resident) / t_fed, the share of a train step fed by the input pipeline (host
  batching, transfer, prefetch) spent waiting for it, against steps that reuse one batch already on the devices,
  timed alternately; input_leaves_devices_idle is whether it is over INPUT_WAIT_TOLERANCE (timing noise);
* train_flops_per_step, train_tflops_per_sec: the FLOPs of one global train step, from XLA's cost analysis, and the
  rate the timed steps achieved (MFU: divide by the devices' peak);
* augmentation_share: (t_aug - t_noaug) / t_aug, the share of the train step spent on augmentation, against the
  same step compiled with data.augment=False, timed alternately;
* peak_host_memory_mb: ru_maxrss of this process. With --train-only it is what a training run holds (the data, one
  train state, one compiled step); otherwise it also counts the second, augmentation-free step and the eval step;
* device_peak_memory_mb: from device.memory_stats(); None where the backend reports none (the CPU);
* memory_breakdown_mb (not with --train-only): what the peak is made of: the uint8 data set in host memory, one
  copy of the train state (params, BatchNorm statistics, optimizer state), and the scratch buffers XLA's compiled
  train and eval steps allocate per call (`memory_analysis().temp_size_in_bytes`: the activations kept for the
  backward pass, mostly).

    python benchmarks/throughput.py --model resnet18 --stem cifar --batch-size 128 [--dtype bfloat16]
                                    [--eval-batch-size N] [--steps 5] [--repeats 3] [--no-augment] [--train-only]
                                    [--no-breakdown] [--json]
    python benchmarks/throughput.py --config configs/resnet18.py --json
    python benchmarks/throughput.py --config configs/resnet18_mix.py --json    # with CutMix
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
    rng = np.random.default_rng(seed)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    labels = lambda n: rng.integers(0, num_classes, n, dtype=np.int32)  # noqa: E731
    return Dataset(
        name="synthetic",
        class_names=tuple(str(i) for i in range(num_classes)),
        train_images=images(num_train),
        train_labels=labels(num_train),
        test_images=images(num_test),
        test_labels=labels(num_test),
        mean=np.full(3, 127.5, np.float32),
        std=np.full(3, 73.9, np.float32),
    )


class TrainLoop:
    """The parallel train step and its replicated state, fed as `loop.train_and_evaluate` feeds it
    (`Setup.train_batches`), or with one batch kept on the devices (`resident`): the step
    alone, with no input work at all."""

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
    step_fn = setup.parallel_eval_step(devices)
    batch_size = setup.config.eval_batch_size
    batch = eval_batch(setup, devices)
    jax.block_until_ready(step_fn(state, batch))  # Compiles.
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([step_fn(state, batch) for _ in range(steps)])
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def without_augmentation(config):
    """A copy of `config` with data.augment off."""
    config = config.copy_and_resolve_references()
    config.data.augment = False
    return config


def device_peak_memory_mb(devices):
    """The largest peak_bytes_in_use over `devices`, in MB; None where the backend reports none."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return round(max(peaks) / 2**20, 1) if peaks else None


def memory_breakdown_mb(loop):
    """The parts of a training run's host memory that this process can account for, in MB."""
    setup, devices, mb = loop.setup, loop.devices, lambda n: round(n / 2**20, 1)  # noqa: E731
    dataset = setup.dataset
    temp = lambda step_fn, *args: step_fn.lower(*args).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    return {
        "data": mb(
            sum(
                a.nbytes for a in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
            )
        ),
        "train_state": mb(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(setup.fresh_state))),
        "train_step_scratch": mb(temp(setup.parallel_train_step(devices), loop.state, loop.resident)),
        "eval_step_scratch": mb(temp(setup.parallel_eval_step(devices), loop.state, eval_batch(setup, devices))),
    }


def train_step_flops(setup, devices) -> float:
    """FLOPs of one train step on one device, from XLA's cost analysis of the per-device step.

    pmap's lowering hides the mapped body from the analysis (it reports a fifth of the FLOPs of
    a ResNet-18 step), so the step is vmapped over a one-element axis and lowered, not compiled.
    """
    config, dataset = setup.config, setup.dataset
    state = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], setup.fresh_state)
    batch = pipeline.train_batch(
        dataset.train_images,
        dataset.train_labels,
        0,
        batch_size=config.batch_size // len(devices),
        seed=config.seed,
        mix=train.mixes(config),
    )
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
        plain = TrainLoop(train.Setup(without_augmentation(config), dataset), devices)
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
    # The devices wait for input only if steps fed by the input pipeline are slower than steps
    # on a batch already there.
    result["input_wait_share"] = round(max(0.0, (t_fed - t_resident) / t_fed), 4)
    result["input_leaves_devices_idle"] = result["input_wait_share"] > INPUT_WAIT_TOLERANCE
    if plain:
        result["augmentation_share"] = round((t_fed - statistics.median(plain_seconds)) / t_fed, 4)
    if not train_only:
        result["eval_images_per_sec"] = round(eval_images_per_sec(setup, devices, loop.state, steps, repeats), 1)
    result["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["device_peak_memory_mb"] = device_peak_memory_mb(devices)
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
    parser.add_argument(
        "--parallel", default=None, choices=sorted(parallel.LAYOUTS), help="device layout; default: the config's"
    )
    parser.add_argument("--num-train", type=int, default=CIFAR10_TRAIN, help="synthetic train images held in memory")
    parser.add_argument("--num-test", type=int, default=CIFAR10_TEST)
    parser.add_argument("--no-augment", action="store_true", help="train without the on-device augmentation")
    parser.add_argument("--train-only", action="store_true", help="skip the eval and augmentation-share timings")
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the augmentation share and the memory breakdown (two more compilations)",
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
    result = {
        "framework": "jax",
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "model": config.model.name,
        "stem": config.model.stem if config.model.name in models.STEM_MODELS else None,
        "batch_size": config.batch_size,
        "eval_batch_size": config.eval_batch_size,
        "dtype": config.model.dtype,
        "parallel": config.parallel,
        "augment": config.data.augment,
        **{k: config[k] for k in ("mixup_alpha", "cutmix_alpha")},
        **{k: getattr(args, k) for k in ("steps", "repeats", "num_train")},
    }
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
