"""`--mode summary`: the configured model's table, drawn by Flax's own `nn.tabulate`.

One row per top-level layer (stem, residual blocks, head) with its output shape, its
forward FLOPs on one image of the data set's shape (its registry entry's; XLA's cost estimate)
and its variables; then the totals. Only the config is needed: no data set (of an image
folder, only its class names), no checkpoint.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import models, train
from resnet_jax.data import registry

WIDTH = 160  # characters: wide enough that rich does not abbreviate the shapes


def forward_flops(model, variables, image) -> int:
    """XLA's estimate of the FLOPs of one inference forward pass on `image`."""
    apply = functools.partial(model.apply, train=False)
    return int(jax.jit(apply).lower(variables, image).cost_analysis()["flops"])


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
    lines = [line.rstrip() for line in table.splitlines()]
    return "\n".join(
        lines
        + [
            f"{config.model.name} for {config.data.name} ({num_classes} classes, {config.model.dtype}): "
            f"{params:,} trained parameters + {stats:,} BatchNorm statistics = {params + stats:,} variables",
            f"Forward FLOPs per {image_shape[0]}x{image_shape[1]} image: {forward_flops(model, variables, image):,}",
        ]
    )
