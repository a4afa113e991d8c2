"""Per-convolution timings, JAX (XLA) vs PyTorch, for every convolution of a CIFAR ResNet.

Where does a train step's time go? Convolutions are ~90% of a ResNet-18 step's FLOPs,
so this times each of them alone, forward, input gradient (dx) and weight gradient
(dw), at the training batch size, in JAX (under the XLA flags run.py sets) and in
PyTorch (channels_last, 2 threads or --threads), each framework in its own subprocess,
and prints the per-layer times and their totals weighted by how often each layer
occurs in the model. Comparing the totals with the whole train step (compare.py) shows
how much of the step, and of the JAX/PyTorch gap, is convolution kernels.

    python benchmarks/conv_ops.py --model resnet18 --batch-size 128 [--dtype float32] [--json]

Needs PyTorch beside JAX for the PyTorch side (docs/measurements.md, 'The PyTorch side'); without it, JAX only.
"""

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def layer_shapes(stage_sizes, image_size=32, width=64):
    """{(height, in_channels, out_channels, kernel, stride): count} for a CIFAR-stem BasicBlock ResNet."""
    shapes = collections.Counter({(image_size, 3, width, 3, 1): 1})  # The stem.
    size, channels = image_size, width
    for i, blocks in enumerate(stage_sizes):
        out = width * 2**i
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            shapes[(size, channels, out, 3, stride)] += 1
            if stride == 2:
                shapes[(size, channels, out, 1, 2)] += 1  # The projection shortcut.
                size //= 2
            shapes[(size, out, out, 3, 1)] += 1
            channels = out
    return shapes


def median_ms(fn, repeats):
    """Median milliseconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_jax(shape, batch_size, dtype, repeats):
    """(forward, dx, dw) milliseconds of one convolution in JAX."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    size, cin, cout, k, stride = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch_size, size, size, cin)), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, dtype)

    def conv(x, w):  # As flax.linen.Conv lowers it.
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    g = jnp.ones_like(conv(x, w))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return (
        median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
        median_ms(lambda: dx(x, w, g).block_until_ready(), repeats),
        median_ms(lambda: dw(x, w, g).block_until_ready(), repeats),
    )


def time_torch(shape, batch_size, dtype, repeats):
    """(forward, dx, dw) milliseconds of one convolution in PyTorch, channels_last."""
    import torch

    size, cin, cout, k, stride = shape
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(batch_size, cin, size, size, dtype=torch_dtype).to(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, dtype=torch_dtype) * 0.05).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=k // 2)  # noqa: E731
    g = torch.ones_like(conv())

    def forward():
        with torch.no_grad():
            conv()

    fwd = median_ms(forward, repeats)
    # Autograd needs the forward pass; subtract it.
    dx = median_ms(lambda: torch.autograd.grad(conv(), x, g), repeats) - fwd
    dw = median_ms(lambda: torch.autograd.grad(conv(), w, g), repeats) - fwd
    return fwd, dx, dw


def measure(framework, model, batch_size, dtype, repeats, threads):
    """{"layers": [...], "totals": {...}} for one framework, in this process."""
    if framework == "jax":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from resnet_jax import xla_flags

        xla_flags.set_cpu_defaults(dtype)  # The XLA flags run.py trains with.
        time_one = time_jax
    else:
        import torch

        torch.set_num_threads(threads)
        time_one = time_torch
    layers, totals = [], dict.fromkeys(("forward", "dx", "dw"), 0.0)
    for shape, count in layer_shapes(STAGE_SIZES[model]).items():
        times = dict(zip(totals, time_one(shape, batch_size, dtype, repeats)))
        layers.append({"shape": shape, "count": count, **{key: round(value, 1) for key, value in times.items()}})
        for key, value in times.items():
            totals[key] += count * value
    totals = {key: round(value, 1) for key, value in totals.items()}
    totals["all"] = round(sum(totals.values()), 1)
    return {"framework": framework, "layers": layers, "totals": totals}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(STAGE_SIZES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    parser.add_argument("--framework", choices=("jax", "torch"), help=argparse.SUPPRESS)  # One side, in-process.
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    if args.framework:
        print(json.dumps(measure(args.framework, args.model, args.batch_size, args.dtype, args.repeats, args.threads)))
        return

    frameworks = ["jax"] + (["torch"] if importlib.util.find_spec("torch") else [])
    results = {}
    for framework in frameworks:  # Each in a fresh process: no shared thread pools.
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--framework",
            framework,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    summary = {
        "model": args.model,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        **{f"{name}_ms": result["totals"] for name, result in results.items()},
    }
    if "torch" in results:
        summary["jax_over_torch_time"] = round(results["jax"]["totals"]["all"] / results["torch"]["totals"]["all"], 3)
    if not args.json:
        print(f"{'height cin cout k stride (count)':34}" + "".join(f"{name + ' fwd/dx/dw ms':>26}" for name in results))
        for i, layer in enumerate(results["jax"]["layers"]):
            label = " ".join(map(str, layer["shape"])) + f" (x{layer['count']})"
            cells = [
                "/".join(f"{r['layers'][i][key]:.1f}" for key in ("forward", "dx", "dw")) for r in results.values()
            ]
            print(f"{label:34}" + "".join(f"{cell:>26}" for cell in cells))
        for name, result in results.items():
            print(f"{name} total (weighted by count): {result['totals']} ms per step")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
