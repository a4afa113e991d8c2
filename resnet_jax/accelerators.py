"""What the run is on: the start-up line, and a warning when an NVIDIA GPU sits unused.

A CUDA VM where `pip install` picked the CPU-only jaxlib trains happily at a hundredth of
the speed; one line at start-up says so and names the extra that fixes it.
"""

import glob
import logging
import os
import re
from typing import Optional

# NVIDIA drivers from this major version on run CUDA 13 wheels; older ones need CUDA 12's.
CUDA13_MIN_DRIVER = 580


def startup_line() -> str:
    """Backend, device kind and count, processes, and the jax/jaxlib versions."""
    import jax
    import jaxlib

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}) on {jax.default_backend()}: "
        f"{len(devices)} x {', '.join(kinds)} ({jax.local_device_count()} local) in {jax.process_count()} process(es)"
    )


def nvidia_driver(root: str = "/") -> Optional[str]:
    """The NVIDIA kernel driver's version if a GPU is visible on this machine, "" if the version
    is unknown, None if no NVIDIA GPU is visible."""
    gpus = glob.glob(os.path.join(root, "proc/driver/nvidia/gpus/*")) or glob.glob(
        os.path.join(root, "dev/nvidia[0-9]*")
    )
    if not gpus:
        return None
    try:
        with open(os.path.join(root, "proc/driver/nvidia/version")) as f:
            match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", f.read())
    except OSError:
        return ""
    return match.group(1) if match else ""


def cuda_extra(driver: str) -> str:
    """The pyproject extra whose jax CUDA wheels run on `driver` ("" when unknown: the newest)."""
    major = int(driver.split(".")[0]) if driver else CUDA13_MIN_DRIVER
    return "cuda13" if major >= CUDA13_MIN_DRIVER else "cuda12"


def cpu_fallback_warning(backend: str, driver: Optional[str], jax_platforms: str = "") -> Optional[str]:
    """One line when an NVIDIA GPU is visible (`driver` not None) but JAX runs on the CPU,
    unless JAX_PLATFORMS asked for the CPU on purpose."""
    if backend != "cpu" or driver is None or jax_platforms:
        return None
    extra = cuda_extra(driver)
    return (
        f"an NVIDIA GPU is visible (driver {driver or 'unknown'}) but JAX runs on the CPU, many times slower: "
        f"install JAX's CUDA build with pip install -e '.[{extra}]' (no -c constraints-*.txt, which pin the CPU build)"
    )


def log_platform() -> None:
    """Logs the start-up line, and the CPU-fallback warning where it applies."""
    import jax

    logging.info("%s", startup_line())
    warning = cpu_fallback_warning(jax.default_backend(), nvidia_driver(), os.environ.get("JAX_PLATFORMS", ""))
    if warning:
        logging.warning("%s", warning)
