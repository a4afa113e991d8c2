"""Defaults that the entry points set before JAX is imported: XLA:CPU's flags, and JAX's
persistent compilation cache.

XLA:CPU hands every convolution to YNNPACK, whose convolutions are much slower than XLA's
own (Eigen) ones on a few CPU cores, and leaves the elementwise ops to its loop emitter,
which is slow on the batch<->channel transposes that the weight gradients need. Giving
YNNPACK the dots, elementwise ops and reductions and keeping the convolutions in Eigen
makes the train step markedly faster (docs/measurements.md, "The XLA:CPU flag"). The flags
only tune the XLA:CPU compiler: GPU and TPU computations are unaffected.

The flag is experimental, and an unknown flag in XLA_FLAGS aborts the process. So it is
set as is for the jaxlib releases in MEASURED_JAXLIB, where its speed-up was checked; for any other,
a child process first checks that XLA still accepts it, and if XLA refuses it the run
goes on without it and says so on stderr: neither dropped silently nor fatal. A value the
user chose is never overridden.

The compilation cache keeps every compiled step on disk, so a resumed or repeated run of the
same config on the same machine skips compilation (docs/training.md, "Compilation cache").
"""

import importlib.metadata
import os
import subprocess
import sys

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
MEASURED_JAXLIB = ("0.11.", "0.12.")


def accepted(flags: str) -> bool:
    """Whether XLA:CPU starts with `flags` in XLA_FLAGS (a child process, so it costs one jax start-up)."""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def set_cpu_defaults(environ=os.environ) -> None:
    """Adds CPU_DEFAULTS to environ["XLA_FLAGS"], keeping any flag already there.

    Call before `import jax`. Does nothing when jaxlib is missing or JAX_PLATFORMS leaves
    out the CPU; on a jaxlib outside MEASURED_JAXLIB, adds only the flags XLA accepts.
    """
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return
    flags = environ.get("XLA_FLAGS", "")
    for name, value in CPU_DEFAULTS.items():
        flag = f"--{name}={value}"
        if f"--{name}=" in flags:
            continue
        if not jaxlib_version.startswith(MEASURED_JAXLIB) and not accepted(flag):
            print(
                f"resnet_jax: jaxlib {jaxlib_version}'s XLA refuses {flag}; training on the CPU without it "
                f"(1.7 times slower on jaxlib 0.11 and 0.12). Fix: measure and update resnet_jax/xla_flags.py",
                file=sys.stderr,
            )
            continue
        flags = f"{flags} {flag}".strip()
    environ["XLA_FLAGS"] = flags


def set_compilation_cache(environ=os.environ) -> None:
    """Turns on JAX's persistent compilation cache in $XDG_CACHE_HOME/resnet_jax/jax (by default
    ~/.cache/resnet_jax/jax), unless JAX_COMPILATION_CACHE_DIR names another, for every program:
    a start compiles many that take under jax's default threshold of a second each, and together
    they are most of what a cached train step leaves. Call before `import jax`."""
    cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_home, "resnet_jax", "jax"))
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
