"""Where a train step's time goes, per kind of operation, in JAX (XLA) and in PyTorch.

Traces the trainer's train step (`throughput.TrainLoop`, run.py's XLA flags) with jax.profiler and
`torch_reference.training_step` (for airbench93/94, airbench's own network from --airbench) with
torch.profiler, each in its own process; rows: kind, then per side milliseconds per step and share
of the step. XLA's ops are classified from the compiled HLO (jax's metadata marks the backward
pass), PyTorch's by aten name. XLA:CPU emits no trace event for its Eigen and oneDNN convolutions:
their time is JAX's untraced remainder (conv_ops.py times them).
JAX's ops may overlap, so its kinds can add up to more than the step.

    python benchmarks/op_profile.py --model resnet18 --batch-size 128 [--dtype bfloat16] [--json]
    python benchmarks/op_profile.py --config configs/airbench93.py [--dtype bfloat16] --airbench AIRBENCH_CHECKOUT
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ELEMENTWISE = "elementwise and reductions (BatchNorm, activations, loss, optimizer)"
UNTRACED = "untraced (XLA: Eigen, oneDNN convolutions), gaps"
KINDS = ("convolution forward", "convolution gradients (input and weight)", "dense layer", ELEMENTWISE,
         "layout copies and transposes", "other", UNTRACED)  # fmt: skip
TORCH_KINDS = (  # (kind, aten op names it holds); first match wins, everything else is "other".
    ("convolution forward", ("convolution", "mkldnn_convolution", "_convolution", "conv2d")),
    ("convolution gradients (input and weight)", ("convolution_backward",)),
    ("dense layer", ("addmm", "mm", "linear")),
    ("layout copies and transposes", ("copy_", "contiguous", "clone", "to", "_to_copy", "t", "transpose")),
)


def hlo_kinds(hlo_text: str) -> dict:
    """{instruction name: kind} for the compiled step's instructions, from the HLO text."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = computations.setdefault(header.group(1), [])
        elif current is not None and "=" in line:
            current.append(line)

    def ops(lines, depth=0):
        """The opcodes (and custom-call targets) of `lines`, with those of the computations they call."""
        found = set()
        for line in lines:
            found.update(re.findall(r"=\s*\S+\s+([\w\-]+)\(", line)[:1])  # the opcode
            found.update(re.findall(r'custom_call_target="([^"]+)"', line))
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line) if depth < 4 else ():
                found |= ops(computations.get(called, []), depth + 1)
        return found

    kinds = {}
    for lines in computations.values():
        for line in lines:
            name = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
            if name:
                kinds[name.group(1)] = hlo_kind(line, ops([line]))
    return kinds


def hlo_kind(line: str, ops: set) -> str:
    """The kind of one HLO instruction, from its opcodes and jax's metadata ("transpose(": backward pass)."""
    if any("convolution" in op for op in ops):
        return "convolution gradients (input and weight)" if "transpose(" in line else "convolution forward"
    if "dot" in ops or any("matmul" in op for op in ops):
        return "dense layer"
    if ops & {"copy", "transpose"} and not ops & {"reduce", "multiply", "add", "subtract", "maximum"}:
        return "layout copies and transposes"
    if ops & {"reduce", "multiply", "add", "subtract", "maximum", "divide", "exponential", "select", "compare"}:
        return ELEMENTWISE
    return "other"


def jax_side(args) -> dict:
    """{kind: milliseconds per step} of the trainer's train step, from a jax.profiler trace."""
    sys.path.insert(0, HERE)
    import jax
    import throughput

    from resnet_jax import train, xla_flags

    config = throughput.make_config(args)
    xla_flags.set_cpu_defaults(config.model.dtype)  # The XLA flags run.py trains with.
    setup = train.Setup(config, throughput.synthetic_dataset(4 * config.batch_size, config.eval_batch_size))
    loop = throughput.TrainLoop(setup, jax.local_devices())
    kinds = hlo_kinds(loop.step_fn.lower(loop.state, loop.resident).compile().as_text())
    loop.run(2, resident=True)  # Compiles and warms up.
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            seconds = loop.run(args.steps, resident=True)
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e["name"] in kinds]
    totals = collections.Counter()
    for event in events:
        totals[kinds[event["name"]]] += event["dur"] / 1e3 / args.steps
    busy, end = 0.0, 0.0  # The union of the operations' intervals: the time some operation ran.
    for event in sorted(events, key=lambda e: e["ts"]):
        busy += max(0.0, event["ts"] + event["dur"] - max(event["ts"], end))
        end = max(end, event["ts"] + event["dur"])
    step_ms = 1e3 * seconds / args.steps
    totals[UNTRACED] = max(0.0, step_ms - busy / 1e3 / args.steps)
    return {"jax": jax.__version__, "step_ms": step_ms, "ms_per_step": dict(totals)}


def torch_kind(name: str) -> str:
    op = name.removeprefix("aten::")
    for kind, names in TORCH_KINDS:
        if op in names or any(n.endswith("_") and op.startswith(n) for n in names):
            return kind
    return ELEMENTWISE if name.startswith("aten::") else "other"


def torch_side(args) -> dict:
    """{kind: milliseconds per step} of the PyTorch reference step, from torch.profiler's self times."""
    sys.path.insert(0, HERE)
    import torch
    from torch_reference import training_step

    net = None
    if args.model.startswith("airbench"):  # airbench's own network, its device lines moved to the CPU
        from airbench_reference import move_to_cpu

        move_to_cpu()
        sys.path.insert(0, args.airbench)
        import airbench

        net = getattr(airbench, f"make_net{args.model[-2:]}")()
    step, _ = training_step(args.stem or "cifar", args.batch_size, args.dtype, "cpu", args.model, net)
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_ms = 1e3 * (time.perf_counter() - start) / args.steps
    totals = collections.Counter()
    for event in profile.key_averages():
        if event.key.startswith("aten::"):  # Leaf ops' self time: each microsecond counted once.
            totals[torch_kind(event.key)] += event.self_cpu_time_total / 1e3 / args.steps
    totals[UNTRACED] = max(0.0, step_ms - sum(totals.values()))
    return {"torch": torch.__version__, "step_ms": step_ms, "ms_per_step": dict(totals)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a configs/*.py file: the JAX side's model, dtype")
    parser.add_argument("--model", default=None, help="default: the config's (resnet18)")
    parser.add_argument("--stem", default=None, choices=("cifar", "imagenet"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=3, help="steps traced on each side")
    parser.add_argument("--no-torch", action="store_true", help="profile the JAX side only")
    parser.add_argument("--torch-python", default=sys.executable, help="the interpreter with PyTorch installed")
    parser.add_argument("--airbench", help="a checkout of cifar10-airbench: PyTorch's side of airbench93/94")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    args.no_augment, args.parallel, args.eval_batch_size = False, None, None  # as throughput.make_config reads them
    if args.side:
        print(json.dumps((jax_side if args.side == "jax" else torch_side)(args)))
        return
    sys.path.insert(0, HERE)
    import throughput
    from compare import run_json

    config = throughput.make_config(args)  # PyTorch's side trains the model, dtype and batch of the JAX side's config
    model = config.model
    if model.name.startswith("airbench") and not (args.no_torch or args.airbench):
        parser.error(f"--airbench: {model.name}'s PyTorch side is airbench's own network: give a checkout of it")
    argv = [os.path.abspath(__file__), *(a for a in sys.argv[1:] if a not in ("--json", "--no-torch"))]
    sides = {"JAX": run_json([sys.executable, *argv, "--side", "jax"])}
    if not args.no_torch:
        model_args = ["--model", model.name, "--dtype", model.dtype, "--batch-size", str(config.batch_size)]
        sides["PyTorch"] = run_json([args.torch_python, *argv, *model_args, "--side", "torch"])
    rows = []  # kind, then per side its milliseconds per step and share of the step
    for kind in (*KINDS, "step"):
        row = [kind]
        for side in sides.values():
            ms = side["step_ms"] if kind == "step" else side["ms_per_step"].get(kind, 0.0)
            row += [round(ms, 1), round(100 * ms / side["step_ms"], 1)]
        rows.append(row)
    if not args.json:
        print(f"{'kind of operation':70}" + "".join(f"{n + ' ms/step':>16}{'share %':>9}" for n in sides))
        for row in rows:
            print(f"{row[0]:70}" + "".join(f"{ms:16.1f}{share:9.1f}" for ms, share in zip(row[1::2], row[2::2])))
    print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "side"}, "sides": sides, "rows": rows}))


if __name__ == "__main__":
    main()
