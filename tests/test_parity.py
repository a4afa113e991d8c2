"""Parity of the Flax ResNet-18 with the PyTorch reference, through `resnet_jax.convert`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: docs/measurements.md, 'The PyTorch side'")

from benchmarks import torch_reference  # noqa: E402
from resnet_jax import models  # noqa: E402
from resnet_jax.convert import torch_to_flax  # noqa: E402

STAGE_SIZES = (2, 2, 2, 2)
# torchvision.models.resnet18(num_classes=10), and the same with a 3x3 stem conv.
PARAM_COUNTS = {"imagenet": 11_181_642, "cifar": 11_173_962}


@pytest.fixture(scope="module", params=["imagenet", "cifar"])
def stem(request):
    """Both stems of ResNet-18."""
    return request.param


@pytest.fixture(scope="module")
def reference(stem):
    """The PyTorch ResNet-18 in eval mode, with random BatchNorm affine params and running stats."""
    torch.manual_seed(0)
    net = torch_reference.resnet("resnet18", num_classes=10, stem=stem)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_param_counts_match_torchvision(reference, stem):
    converted = torch_to_flax(reference.state_dict(), STAGE_SIZES)
    assert sum(p.numel() for p in reference.parameters()) == PARAM_COUNTS[stem]
    assert models.num_params(converted["params"]) == PARAM_COUNTS[stem]


def test_converted_tree_matches_init(reference, stem):
    model = models.get_model("resnet18", num_classes=10, stem=stem)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    converted = torch_to_flax(reference.state_dict(), STAGE_SIZES)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), tree)  # noqa: E731
    assert jax.tree.structure(converted) == jax.tree.structure(expected)
    assert shapes(converted) == shapes(expected)


def test_logits_match_torch(reference, stem):
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        torch_logits = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    model = models.get_model("resnet18", num_classes=10, stem=stem)
    variables = torch_to_flax(reference.state_dict(), STAGE_SIZES)
    flax_logits = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
    assert np.abs(torch_logits).max() > 0.1  # the comparison is not between near-zero logits
    np.testing.assert_allclose(flax_logits, torch_logits, rtol=0, atol=1e-4)


def test_rejects_missing_and_unmapped_keys(reference):
    state_dict = dict(reference.state_dict())
    state_dict["extra.weight"] = state_dict.pop("layer2.0.downsample.1.running_var")
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.1\.running_var.*extra\.weight"):
        torch_to_flax(state_dict, STAGE_SIZES)
    with pytest.raises(ValueError, match=r"layer4\.2\.conv1\.weight"):
        torch_to_flax(reference.state_dict(), (2, 2, 2, 3))
