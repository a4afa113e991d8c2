"""torchvision's bottleneck ResNets (50, 101, 152) through `resnet_jax.convert`.

torchvision's side is tests/fixtures/torchvision_names.json, written by
tests/fixtures/make_torchvision_names.py from torchvision's own models where torch is installed:
each state_dict's keys and shapes, in order. The names each key maps to are written here from
torchvision's layout, so the tests hold the converter's mapping and the models' parameter shapes
against torchvision, not against the mapping itself.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_torchvision_names
from flax import traverse_util

from resnet_jax import models
from resnet_jax.convert import torch_to_flax

with open(make_torchvision_names.PATH) as f:
    FIXTURE = json.load(f)
# He et al. (2016), Table 1: the blocks of each stage.
STAGE_SIZES = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias")}
BN_FIELDS.update(running_mean=("batch_stats", "mean"), running_var=("batch_stats", "var"))


def flax_name(key):
    """(collection, path) of torchvision's `key` in this package's ResNet, from torchvision's layout:
    conv1/bn1 the stem, layerI.J the J-th block (from 0) of stage I, its downsample a 1x1 conv (.0)
    and a BatchNorm (.1), fc the head."""
    *module, field = key.split(".")
    module = ".".join(module)
    names = {"conv1": ("conv_init",), "bn1": ("bn_init",), "fc": ("head",)}
    if module in names:
        path = names[module]
    else:
        stage, block, layer = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", module).groups()
        layer = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}.get(layer, layer)
        path = (f"stage{stage}_block{int(block) + 1}", layer)
    if module == "fc" or "conv" in path[-1]:
        return "params", path + ({"weight": "kernel", "bias": "bias"}[field],)
    collection, name = BN_FIELDS[field]
    return collection, path + (name,)


@pytest.mark.parametrize("name", make_torchvision_names.MODELS)
def test_torchvision_bottleneck_state_dicts_convert_name_by_name(name):
    entries = FIXTURE[name]
    # Each tensor a constant of its own: where it lands says which name it was mapped to.
    state_dict = {key: np.broadcast_to(np.float32(i), shape) for i, (key, shape) in enumerate(entries)}
    variables = torch_to_flax(state_dict, STAGE_SIZES[name], block="bottleneck")
    flat = {c: traverse_util.flatten_dict(variables[c]) for c in variables}
    counters = ("num_batches_tracked",)  # torch's BatchNorm step counters: no Flax counterpart
    mapped = [(i, key, *flax_name(key)) for i, (key, _) in enumerate(entries) if not key.endswith(counters)]
    for i, key, collection, path in mapped:
        leaf = flat[collection][path]
        assert leaf.flat[0] == i, f"{key} went to {'/'.join(flat_name(flat, i))}, not {collection}/{'/'.join(path)}"
    assert sum(map(len, flat.values())) == len(mapped)
    # The converted tree is the model's own: the same names and shapes.
    model = models.get_model(name, num_classes=1000, stem="imagenet")
    init = functools.partial(model.init, train=False)
    expected = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    assert shapes(variables) == shapes(expected)


def flat_name(flat, i):
    """The Flax path holding constant `i`, for the failure message."""
    return next((c,) + path for c in flat for path, leaf in flat[c].items() if leaf.flat[0] == i)
