"""The XLA:CPU defaults that run.py sets before importing jax."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from resnet_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def tested_jaxlib(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.2")


def test_adds_the_defaults_after_the_users_flags(tested_jaxlib):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    xla_flags.set_cpu_defaults(environ=environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}=dot,reduce"


@pytest.mark.parametrize("support", ["avx512_bf16", None])
def test_bfloat16_adds_onednn_where_the_cpu_has_bfloat16_instructions_and_says_which_path(
    tested_jaxlib, monkeypatch, support
):
    monkeypatch.setattr(xla_flags, "cpu_bfloat16_support", lambda: support)
    float32 = {}
    assert xla_flags.set_cpu_defaults("float32", float32) is None
    environ = {}
    path = xla_flags.set_cpu_defaults("bfloat16", environ)
    assert float32["XLA_FLAGS"] == f"{FLAG}=dot,reduce"
    if support:
        assert environ["XLA_FLAGS"] == f"{FLAG}=dot,reduce --xla_cpu_experimental_onednn_custom_call=true"
        assert path == "bfloat16 on the CPU: convolutions in oneDNN's bfloat16 kernels (avx512_bf16)"
    else:
        assert environ["XLA_FLAGS"] == float32["XLA_FLAGS"]
        assert "lacks AVX512-BF16 and AMX" in path


def test_keeps_a_value_the_user_set(tested_jaxlib):
    environ = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    xla_flags.set_cpu_defaults(environ=environ)
    assert environ["XLA_FLAGS"] == f"{FLAG}=individual_convolution"


@pytest.mark.parametrize("platforms", ["cuda", "tpu"])
def test_leaves_runs_without_the_cpu_alone(tested_jaxlib, platforms):
    environ = {"JAX_PLATFORMS": platforms}
    xla_flags.set_cpu_defaults(environ=environ)
    assert "XLA_FLAGS" not in environ


def test_the_installed_jaxlib_is_measured_and_its_xla_takes_the_flag():
    """Fails on a jaxlib the flag was not measured with (a new lock file, a new leg): measure it
    (docs/measurements.md, "The XLA:CPU flags"), then add it to MEASURED_JAXLIB; and fails if
    this XLA refuses the flag."""
    version = importlib.metadata.version("jaxlib")
    assert version.startswith(xla_flags.MEASURED_JAXLIB), f"jaxlib {version} is not in MEASURED_JAXLIB"
    environ = {}
    xla_flags.set_cpu_defaults(environ=environ)
    assert environ["XLA_FLAGS"] == f"{FLAG}=dot,reduce"
    every = {**xla_flags.CPU_DEFAULTS, **xla_flags.BFLOAT16_DEFAULTS}
    assert xla_flags.accepted(" ".join(f"--{name}={value}" for name, value in every.items()))


def test_xla_refuses_an_unknown_flag():
    assert not xla_flags.accepted("--xla_cpu_no_such_flag_anywhere=1")


@pytest.mark.parametrize("accepts", [True, False])
def test_a_newer_jaxlib_gets_the_flag_only_if_its_xla_accepts_it(monkeypatch, capsys, accepts):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.0.0")
    probed = []
    monkeypatch.setattr(xla_flags, "accepted", lambda flags: probed.append(flags) or accepts)
    environ = {}
    xla_flags.set_cpu_defaults(environ=environ)
    assert probed == [f"{FLAG}=dot,reduce"]
    if accepts:
        assert environ["XLA_FLAGS"] == probed[0] and capsys.readouterr().err == ""
    else:
        assert environ["XLA_FLAGS"] == ""
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refuses" in err and "xla_flags.py" in err


def test_the_compilation_cache_defaults_to_the_users_cache_folder_and_gives_way_to_jaxs_variable(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path)}
    xla_flags.set_compilation_cache(environ)
    assert environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "resnet_jax" / "jax")
    assert environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # the small programs too
    environ = {"JAX_COMPILATION_CACHE_DIR": "elsewhere", "XDG_CACHE_HOME": str(tmp_path)}
    xla_flags.set_compilation_cache(environ)
    assert environ["JAX_COMPILATION_CACHE_DIR"] == "elsewhere"


def test_jax_compiles_into_the_default_cache_folder(tmp_path):
    """jax takes the folder set before its import: a compiled function lands in it."""
    code = (
        "import os, sys; sys.path.insert(0, os.getcwd()); from resnet_jax import xla_flags;"
        " xla_flags.set_compilation_cache(); import jax, jax.numpy as jnp;"
        " print(jax.config.jax_compilation_cache_dir);"
        " jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()"
    )
    cache_variables = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in os.environ.items() if k not in cache_variables}
    env.update(XDG_CACHE_HOME=str(tmp_path))
    cache = tmp_path / "resnet_jax" / "jax"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(cache)
    assert [p for p in cache.iterdir() if p.name.startswith("jit_")], sorted(p.name for p in cache.iterdir())
