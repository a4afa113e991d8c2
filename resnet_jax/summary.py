"""`--mode summary`: Flax's `nn.tabulate` of the configured model, one row per top-level layer with its
output shape, forward FLOPs on one image (XLA's estimate) and variables, then the totals. It needs
only the config: no data set (of an image folder, only its class names), no checkpoint."""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import models, train
from resnet_jax.data import registry

WIDTH = 160  # characters: wide enough that rich does not abbreviate the shapes


def model_table(config) -> str:
    """Flax's table of `config`'s model on one image, then its parameter and FLOP totals."""
    source = registry.DATASETS[config.data.name]  # An image folder's class folders are listed; no image is read.
    num_classes, image_shape = source.num_classes(config.data), source.image_shape(config.data)
    model = train.create_model(config, num_classes)
    image = jnp.zeros((1,) + image_shape, jnp.float32)
    rng = jax.random.key(0)
    table = nn.tabulate(
        model, rng, depth=1, compute_flops=True, console_kwargs={"force_terminal": False, "width": WIDTH}
    )(image, train=False)
    variables = jax.eval_shape(functools.partial(model.init, train=False), rng, image)
    params, stats = models.num_params(variables["params"]), models.num_params(variables["batch_stats"])
    flops = int(jax.jit(functools.partial(model.apply, train=False)).lower(variables, image).cost_analysis()["flops"])
    totals = (
        f"{config.model.name} for {config.data.name} ({num_classes} classes, {config.model.dtype}): "
        f"{params:,} trained parameters + {stats:,} BatchNorm statistics = {params + stats:,} variables\n"
        f"Forward FLOPs per {image_shape[0]}x{image_shape[1]} image: {flops:,}"
    )
    return "\n".join([line.rstrip() for line in table.splitlines()] + [totals])
