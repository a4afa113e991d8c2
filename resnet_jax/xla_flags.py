"""XLA:CPU defaults that the entry points set before JAX is imported.

jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK, whose convolutions are much
slower than XLA's own (Eigen) ones on a few CPU cores, and leaves the elementwise ops
to its loop emitter, which is slow on the batch<->channel transposes that the weight
gradients need. Giving YNNPACK the dots, elementwise ops and reductions and keeping
the convolutions in Eigen makes the ResNet-18 train step much faster on a few CPU cores
(measured with benchmarks/throughput.py: README, "Where the CPU time goes"). The flags
only tune the XLA:CPU compiler: GPU and TPU computations are unaffected.

The flag is experimental, so it is set only for the jaxlib versions it was measured
with (an unknown flag in XLA_FLAGS aborts the process), and never over a value the
user chose.
"""

import importlib.metadata
import os

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
TESTED_JAXLIB = ("0.10.",)


def set_cpu_defaults(environ=os.environ) -> None:
    """Adds CPU_DEFAULTS to environ["XLA_FLAGS"], keeping any flag already there.

    Call before `import jax`. Does nothing when the jaxlib version is not in TESTED_JAXLIB
    or JAX_PLATFORMS leaves out the CPU.
    """
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    platforms = environ.get("JAX_PLATFORMS", "")
    if not jaxlib_version.startswith(TESTED_JAXLIB) or (platforms and "cpu" not in platforms.split(",")):
        return
    flags = environ.get("XLA_FLAGS", "")
    for name, value in CPU_DEFAULTS.items():
        if f"--{name}=" not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
