"""The XLA:CPU defaults that run.py sets before importing jax."""

import importlib.metadata

import pytest

from resnet_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def tested_jaxlib(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")


def test_adds_the_defaults_after_the_users_flags(tested_jaxlib):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    xla_flags.set_cpu_defaults(environ)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}=dot,eltwise,reduce"


def test_keeps_a_value_the_user_set(tested_jaxlib):
    environ = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    xla_flags.set_cpu_defaults(environ)
    assert environ["XLA_FLAGS"] == f"{FLAG}=individual_convolution"


@pytest.mark.parametrize("platforms", ["cuda", "tpu"])
def test_leaves_runs_without_the_cpu_alone(tested_jaxlib, platforms):
    environ = {"JAX_PLATFORMS": platforms}
    xla_flags.set_cpu_defaults(environ)
    assert "XLA_FLAGS" not in environ


def test_leaves_untested_jaxlib_versions_alone(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
    environ = {}
    xla_flags.set_cpu_defaults(environ)
    assert environ == {}
