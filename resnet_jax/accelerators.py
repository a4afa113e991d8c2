"""What the run is on: the start-up line, and a warning naming the extra to install when an NVIDIA
GPU sits unused (a CUDA VM where pip picked the CPU-only jaxlib trains at a hundredth of the speed)."""

import glob
import logging
import os
import re
from typing import Optional

# NVIDIA drivers from this major version on run CUDA 13 wheels; older ones need CUDA 12's.
CUDA13_MIN_DRIVER = 580


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


def cpu_fallback_warning(backend: str, driver: Optional[str], jax_platforms: str = "") -> Optional[str]:
    """One line when an NVIDIA GPU is visible (`driver` not None) but JAX runs on the CPU,
    unless JAX_PLATFORMS asked for the CPU on purpose."""
    if backend != "cpu" or driver is None or jax_platforms:
        return None
    extra = "cuda12" if driver and int(driver.split(".")[0]) < CUDA13_MIN_DRIVER else "cuda13"  # unknown: the newest
    return (
        f"an NVIDIA GPU is visible (driver {driver or 'unknown'}) but JAX runs on the CPU, many times slower: "
        f"install JAX's CUDA build with pip install -e '.[{extra}]' (no -c constraints-*.txt, which pin the CPU build)"
    )


def log_platform(cpu_path: Optional[str] = None) -> None:
    """Logs the start-up line (jax's versions, backend, devices, processes; on the CPU, `cpu_path`:
    how it computes the config's dtype) and the CPU-fallback warning."""
    import jax
    import jaxlib

    devices = jax.devices()
    logging.info(
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}) on {jax.default_backend()}: {len(devices)} x "
        f"{', '.join(sorted({d.device_kind for d in devices}))} ({jax.local_device_count()} local) in "
        f"{jax.process_count()} process(es)" + (f"; {cpu_path}" if cpu_path and jax.default_backend() == "cpu" else "")
    )
    warning = cpu_fallback_warning(jax.default_backend(), nvidia_driver(), os.environ.get("JAX_PLATFORMS", ""))
    if warning:
        logging.warning("%s", warning)
