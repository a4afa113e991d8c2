"""Parity of the Flax ResNet-18 with the PyTorch reference, through `resnet_jax.convert`.

PyTorch's side is tests/fixtures/torch_parity.npz, written by tests/fixtures/make_torch_parity.py
where torch is installed: the reference network's state_dict layout, parameter count and
logits for weights that NumPy rebuilds here from a seed. So these run on every leg, torch or
not; where torch is installed, the logits test also holds the fixture against torch live.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_torch_parity

from resnet_jax import models, xla_flags
from resnet_jax.convert import torch_to_flax

STAGE_SIZES = (2, 2, 2, 2)
# torchvision.models.resnet18(num_classes=10), and the same with a 3x3 stem conv.
PARAM_COUNTS = {"imagenet": 11_181_642, "cifar": 11_173_962}
LOGITS_ATOL = 1e-5  # the README's figure: float32 through two frameworks' kernels
# bfloat16 keeps 8 bits of mantissa: ResNet-18's logits (up to 2.47 here) come within 0.017 of torch's float32.
ATOL = {"float32": LOGITS_ATOL, "bfloat16": 0.04}
PROJECT_FLAGS = tuple(f"--{name}" for name in (*xla_flags.CPU_DEFAULTS, *xla_flags.BFLOAT16_DEFAULTS))
FIXTURE = dict(np.load(make_torch_parity.PATH))


@pytest.fixture(scope="module", params=make_torch_parity.STEMS)
def stem(request):
    """Both stems of ResNet-18."""
    return request.param


def state_dict(stem):
    """The reference network's state_dict as the fixture's script filled it, without torch."""
    keys = list(FIXTURE[f"{stem}_keys"])
    shapes = [tuple(int(d) for d in s.split(",") if d) for s in FIXTURE[f"{stem}_shapes"]]
    return make_torch_parity.state_dict_values(keys, shapes)


def test_param_counts_match_torchvision(stem):
    assert int(FIXTURE[f"{stem}_param_count"]) == PARAM_COUNTS[stem]
    assert models.num_params(torch_to_flax(state_dict(stem), STAGE_SIZES)["params"]) == PARAM_COUNTS[stem]


def test_converted_tree_matches_init(stem):
    model = models.get_model("resnet18", num_classes=10, stem=stem)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    converted = torch_to_flax(state_dict(stem), STAGE_SIZES)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), tree)  # noqa: E731
    assert jax.tree.structure(converted) == jax.tree.structure(expected)
    assert shapes(converted) == shapes(expected)


def torch_logits(stem):
    """The fixture's logits; where torch is installed, also checked against torch live."""
    logits = FIXTURE[f"{stem}_logits"]
    if importlib.util.find_spec("torch"):
        import torch

        from benchmarks import torch_reference

        net = torch_reference.resnet("resnet18", num_classes=10, stem=stem).eval()
        assert list(net.state_dict()) == list(FIXTURE[f"{stem}_keys"])
        net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict(stem).items()})
        with torch.no_grad():
            live = net(torch.from_numpy(make_torch_parity.images().transpose(0, 3, 1, 2).copy())).numpy()
        np.testing.assert_allclose(live, logits, rtol=0, atol=1e-6)
    return logits


def flax_logits(stem, dtype="float32"):
    model = models.get_model("resnet18", num_classes=10, stem=stem, dtype=jnp.dtype(dtype))
    variables = torch_to_flax(state_dict(stem), STAGE_SIZES)
    return np.asarray(model.apply(variables, jnp.asarray(make_torch_parity.images()), train=False), np.float32)


def test_logits_match_torch(stem):
    expected = torch_logits(stem)
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero logits
    np.testing.assert_allclose(flax_logits(stem), expected, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_torch_under_the_xla_flags_run_py_sets_for_each_dtype(stem, dtype):
    """In a child process that sets `xla_flags.set_cpu_defaults(dtype)` before jax starts, as run.py does."""
    environ = dict(os.environ)
    environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith(PROJECT_FLAGS))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))
    command = [sys.executable, os.path.abspath(__file__), stem, dtype]
    done = subprocess.run(command, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert PROJECT_FLAGS[0] in result["xla_flags"]
    np.testing.assert_allclose(result["logits"], torch_logits(stem), rtol=0, atol=ATOL[dtype])


def test_rejects_missing_and_unmapped_keys():
    weights = state_dict("imagenet")
    weights["extra.weight"] = weights.pop("layer2.0.downsample.1.running_var")
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.1\.running_var.*extra\.weight"):
        torch_to_flax(weights, STAGE_SIZES)
    with pytest.raises(ValueError, match=r"layer4\.2\.conv1\.weight"):
        torch_to_flax(state_dict("imagenet"), (2, 2, 2, 3))


if __name__ == "__main__":
    xla_flags.set_cpu_defaults(sys.argv[2])
    logits = flax_logits(sys.argv[1], sys.argv[2])
    print(json.dumps({"xla_flags": os.environ["XLA_FLAGS"], "logits": logits.tolist()}))
