"""The start-up line and the warning for an NVIDIA GPU that JAX does not use."""

import pytest

from conftest import run_cli
from resnet_jax import accelerators, xla_flags


def fake_machine(root, driver_text=None, gpus=1):
    for i in range(gpus):
        (root / "proc/driver/nvidia/gpus" / f"0000:0{i}:00.0").mkdir(parents=True)
    if driver_text is not None:
        (root / "proc/driver/nvidia/version").write_text(driver_text)
    return str(root)


def test_driver_version_is_read_where_a_gpu_is_visible(tmp_path):
    assert accelerators.nvidia_driver(str(tmp_path)) is None
    text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.03  Release Build  (dvs-builder@U16)\n"
    assert accelerators.nvidia_driver(fake_machine(tmp_path / "a", text)) == "580.159.03"
    text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    assert accelerators.nvidia_driver(fake_machine(tmp_path / "b", text)) == "535.104.05"
    assert accelerators.nvidia_driver(fake_machine(tmp_path / "c")) == ""
    (tmp_path / "d/dev").mkdir(parents=True)
    (tmp_path / "d/dev/nvidia0").touch()  # A container: device nodes, no /proc/driver/nvidia/gpus.
    assert accelerators.nvidia_driver(str(tmp_path / "d")) == ""


def test_cpu_fallback_warning_names_the_extra_for_the_driver():
    old = accelerators.cpu_fallback_warning("cpu", "535.104.05")
    assert old.startswith("an NVIDIA GPU is visible (driver 535.104.05) but JAX runs on the CPU")
    assert "pip install -e '.[cuda12]'" in old and "\n" not in old
    assert "pip install -e '.[cuda13]'" in accelerators.cpu_fallback_warning("cpu", "580.159.03")
    assert "pip install -e '.[cuda13]'" in accelerators.cpu_fallback_warning("cpu", "")
    # No warning: no GPU, JAX on the GPU, or the CPU asked for on purpose.
    assert accelerators.cpu_fallback_warning("cpu", None) is None
    assert accelerators.cpu_fallback_warning("gpu", "580.159.03") is None
    assert accelerators.cpu_fallback_warning("cpu", "580.159.03", jax_platforms="cpu") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_py_logs_backend_devices_versions_and_the_cpus_bfloat16_path_at_start(dtype):
    import jax
    import jaxlib

    result = run_cli("--config", "configs/smoke.py", "--mode", "summary", f"--config.model.dtype={dtype}")
    assert result.returncode == 0, result.stderr[-3000:]
    line = f"jax {jax.__version__} (jaxlib {jaxlib.__version__}) on cpu: 8 x cpu (8 local) in 1 process(es)"
    assert line in result.stderr
    assert "NVIDIA GPU is visible" not in result.stderr
    if dtype == "float32":
        assert "bfloat16 on the CPU" not in result.stderr
    elif xla_flags.cpu_bfloat16_support():
        assert f"{line}; bfloat16 on the CPU: convolutions in oneDNN's bfloat16 kernels" in result.stderr
    else:
        assert f"{line}; bfloat16 on the CPU: this CPU lacks AVX512-BF16 and AMX" in result.stderr
