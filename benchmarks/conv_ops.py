"""Per-convolution timings, JAX (XLA) against PyTorch, for every convolution of a CIFAR ResNet.

Times each convolution alone (they are ~90% of a ResNet-18 step's FLOPs): forward, input gradient
(dx), weight gradient (dw), at the training batch size, in JAX (run.py's XLA flags) and PyTorch
(channels_last, --threads), each in its own process. jax_ms, torch_ms: their totals per step, each
layer weighted by its count in the model. JAX only where PyTorch is not installed beside it
(docs/measurements.md, 'The PyTorch side').

    python benchmarks/conv_ops.py --model resnet18 --batch-size 128 [--dtype float32] [--json]
"""

import argparse
import collections
import importlib.util
import json
import os
import statistics
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
    leaf = lambda t: t.to(memory_format=torch.channels_last).requires_grad_()  # noqa: E731
    x = leaf(torch.randn(batch_size, cin, size, size, dtype=torch_dtype))
    w = leaf(torch.randn(cout, cin, k, k, dtype=torch_dtype) * 0.05)
    conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=k // 2)  # noqa: E731
    g = torch.ones_like(conv())
    fwd = median_ms(torch.no_grad()(conv), repeats)
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

    from compare import run_json  # a sibling script; this folder is sys.path[0]

    options = f"--model {args.model} --batch-size {args.batch_size} --dtype {args.dtype} --repeats {args.repeats}"
    options = [*options.split(), "--threads", str(args.threads)]
    results = {}  # Each framework in a fresh process: no shared thread pools.
    for framework in ["jax"] + (["torch"] if importlib.util.find_spec("torch") else []):
        results[framework] = run_json([sys.executable, os.path.abspath(__file__), "--framework", framework, *options])
    summary = {"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype}
    summary.update({f"{name}_ms": result["totals"] for name, result in results.items()})
    if "torch" in results:
        summary["jax_over_torch_time"] = round(results["jax"]["totals"]["all"] / results["torch"]["totals"]["all"], 3)
    if not args.json:
        print(f"{'height cin cout k stride (count)':34}" + "".join(f"{name + ' fwd/dx/dw ms':>26}" for name in results))
        for i, layer in enumerate(results["jax"]["layers"]):
            label = " ".join(map(str, layer["shape"])) + f" (x{layer['count']})"
            cells = ["/".join(f"{r['layers'][i][k]:.1f}" for k in ("forward", "dx", "dw")) for r in results.values()]
            print(f"{label:34}" + "".join(f"{cell:>26}" for cell in cells))
        for name, result in results.items():
            print(f"{name} total (weighted by count): {result['totals']} ms per step")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
