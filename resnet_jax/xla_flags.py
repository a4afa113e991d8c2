"""Defaults that the entry points set before JAX starts its backend: XLA:CPU's flags, and JAX's
persistent compilation cache.

XLA:CPU hands convolutions to YNNPACK, which is slower than XLA's own (Eigen) convolutions on a
few cores; giving YNNPACK only the dots and reductions makes the float32 train step faster. In
bfloat16, XLA:CPU upcasts convolutions to float32 unless its oneDNN custom calls are on, which
run them in bfloat16 on CPUs that have AVX512-BF16 or AMX (and slow float32 down, so they are
set for bfloat16 only). Figures: docs/measurements.md, "The XLA:CPU flags". The flags tune the
XLA:CPU compiler only: GPU and TPU computations are unaffected.

The flags are experimental, and an unknown flag in XLA_FLAGS aborts the process. So they are
set as they are for the jaxlib releases in MEASURED_JAXLIB, where they were measured; for any
other, a child process first checks that XLA still accepts each, and one XLA refuses is left
out with a line on stderr. A value the user chose is never overridden. XLA reads XLA_FLAGS when
JAX starts its first backend, so they can be set after `import jax`, before any computation.
"""

import importlib.metadata
import os
import subprocess
import sys
import warnings

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
BFLOAT16_DEFAULTS = {"xla_cpu_experimental_onednn_custom_call": "true"}  # on CPUs with BFLOAT16_CPU_FLAGS
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
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


def cpu_bfloat16_support() -> str | None:
    """The first of BFLOAT16_CPU_FLAGS this CPU has (from /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in BFLOAT16_CPU_FLAGS if flag in flags), None)


def set_cpu_defaults(dtype: str = "float32", environ=os.environ) -> str | None:
    """Adds the CPU defaults for computations in `dtype` to environ["XLA_FLAGS"], keeping any flag
    already there. Call before JAX starts its backend. Does nothing when jaxlib is missing or
    JAX_PLATFORMS leaves out the CPU; on a jaxlib outside MEASURED_JAXLIB, adds only the flags XLA
    accepts. Returns, for bfloat16, a line saying how this CPU computes it."""
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return None
    defaults, path = dict(CPU_DEFAULTS), None
    if dtype == "bfloat16":
        support = cpu_bfloat16_support()
        if support:
            defaults.update(BFLOAT16_DEFAULTS)
            # XLA cannot serialise oneDNN calls: the cache cannot keep the train step, which compiles at each start.
            warnings.filterwarnings("ignore", "Error writing persistent compilation cache entry", UserWarning)
            path = f"bfloat16 on the CPU: convolutions in oneDNN's bfloat16 kernels ({support})"
        else:
            path = "bfloat16 on the CPU: this CPU lacks AVX512-BF16 and AMX, so convolutions run in float32 (slower)"
    flags = environ.get("XLA_FLAGS", "")
    for name, value in defaults.items():
        flag = f"--{name}={value}"
        if f"--{name}=" in flags:
            continue
        if not jaxlib_version.startswith(MEASURED_JAXLIB) and not accepted(flag):
            print(
                f"resnet_jax: jaxlib {jaxlib_version}'s XLA refuses {flag}; training on the CPU without it "
                f"(slower on jaxlib 0.11 and 0.12). Fix: measure and update resnet_jax/xla_flags.py",
                file=sys.stderr,
            )
            continue
        flags = f"{flags} {flag}".strip()
    environ["XLA_FLAGS"] = flags
    return path


def set_compilation_cache(environ=os.environ) -> None:
    """Turns on JAX's persistent compilation cache in $XDG_CACHE_HOME/resnet_jax/jax (by default
    ~/.cache/resnet_jax/jax), unless JAX_COMPILATION_CACHE_DIR names another, for every program:
    a start compiles many that take under jax's default threshold of a second each, and together
    they are most of what a cached train step leaves. Call before `import jax`."""
    cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_home, "resnet_jax", "jax"))
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
