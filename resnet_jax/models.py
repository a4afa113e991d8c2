"""ResNet model zoo in Flax linen (NHWC).

Two families share one `ResNet` module, and two more networks have their own:

* `resnet18/34/50/101/152`: He et al.'s ImageNet ResNets (v1.5: the stride sits on
  the 3x3 conv of a bottleneck), with an ``"imagenet"`` stem (7x7/2 conv + 3x3/2
  max-pool, as torchvision and the tutorial) or a ``"cifar"`` stem (3x3/1 conv,
  no pool). Shortcuts that change shape are a strided 1x1 conv + BatchNorm.
* `resnet20/32/44/56/110`: He et al. 2016's CIFAR networks (16/32/64 filters,
  parameter-free "option A" shortcuts: stride-2 subsampling and zero-padded
  channels).
* `resnet9`: David Page's DAWNBench network ("How to train your ResNet", 2018): three
  conv-BN-ReLU-max-pool layers of 128/256/512 filters after a 64-filter prep conv, a residual
  of two conv-BN-ReLU after the first and the third, a global max-pool and a 0.125-scaled head.
* `airbench93`, `airbench94`: Keller Jordan's airbench networks (arXiv 2404.00498): a frozen
  2x2 "whitening" conv computed from the training images (`whitening_kernel`), three groups of
  conv-pool-BN-GELU-conv-BN-GELU and a 1/9-scaled head.

The tutorial's residual block is broken (it reads ``self.in_channels`` and
``self.out_channels``, which it never sets, and builds its shortcut by reusing
``conv1``, whose shape does not fit); here the shortcut has its own layers.

BatchNorm state is explicit: running statistics live in the ``batch_stats``
collection, updated only when ``train=True`` and the collection is mutable.

Residual blocks are rematerialised (`nn.remat`, saving only conv outputs): their
BatchNorm and ReLU outputs are recomputed during the backward pass rather than stored.
"""

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ModuleDef = Any

# Kaiming-normal, fan_out, ReLU gain: torch.nn.init.kaiming_normal_(w, mode="fan_out").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's and Conv2d's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_and_norm(model: nn.Module, train: bool):
    """The layers every model is built from: a bias-free Kaiming conv and a BatchNorm that
    computes in `model.dtype` and, when training, averages its statistics over `model.axis_name`."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=model.dtype, kernel_init=conv_kernel_init)
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=model.bn_momentum,
        epsilon=1e-5,
        dtype=model.dtype,
        axis_name=model.axis_name if train else None,
    )
    return conv, norm


def dirac(base_init):
    """`base_init`, then the identity on the first `in` outputs: airbench's `Conv.reset_parameters`
    (PyTorch's default init, then `torch.nn.init.dirac_` on `weight[:in_channels]`)."""

    def init(key, shape, dtype=jnp.float32):
        height, width, channels_in, channels_out = shape
        n = min(channels_in, channels_out)
        identity = jnp.zeros((height, width, channels_in, n), dtype)
        identity = identity.at[height // 2, width // 2, jnp.arange(n), jnp.arange(n)].set(1)
        return base_init(key, shape, dtype).at[..., :n].set(identity)

    return init


def zero_pad_shortcut(x, filters: int, strides: Tuple[int, int]):
    """He et al.'s option A: subsample spatially, zero-pad the new channels evenly."""
    x = x[:, :: strides[0], :: strides[1], :]
    extra = filters - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (expansion 1)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)
    shortcut: str = "projection"  # or "zero_pad" (option A, no parameters)
    zero_init_last: bool = False  # start the branch's last BN scale at 0
    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        y = last_norm(self, "bn2")(y)
        if residual.shape != y.shape:
            residual = shortcut(self, residual, self.filters)
        return self.act(residual + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)
    shortcut: str = "projection"
    zero_init_last: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = last_norm(self, "bn3")(y)
        if residual.shape != y.shape:
            residual = shortcut(self, residual, self.filters * 4)
        return self.act(residual + y)


def last_norm(block, name):
    """The last BatchNorm of a residual branch, optionally starting at scale 0."""
    if block.zero_init_last:
        return block.norm(name=name, scale_init=nn.initializers.zeros_init())
    return block.norm(name=name)


def shortcut(block, x, filters):
    """The shape-changing shortcut of `block`: projection (1x1 conv + BN) or option A."""
    if block.shortcut == "zero_pad":
        return zero_pad_shortcut(x, filters, block.strides)
    x = block.conv(filters, (1, 1), block.strides, name="proj_conv")(x)
    return block.norm(name="proj_bn")(x)


class ResNet(nn.Module):
    """ResNet v1 for NHWC images; returns float32 logits."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": 3x3/1 conv
    shortcut: str = "projection"  # "projection" (1x1 conv + BN) or "zero_pad" (option A)
    zero_init_residual: bool = False  # last BN scale of each residual branch starts at 0
    dtype: Any = jnp.float32  # computation dtype; params and BN statistics stay float32
    axis_name: Optional[str] = None  # the devices' axis to average BN statistics over (sync BN)
    bn_momentum: float = 0.9  # flax convention: torch's momentum=0.1
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.shortcut not in ("projection", "zero_pad"):
            raise ValueError(f"shortcut must be 'projection' or 'zero_pad', got {self.shortcut!r}")
        conv, norm = conv_and_norm(self, train)
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=3, name="conv_init")(x)
            x = self.act(norm(name="bn_init")(x))
            # torch's MaxPool2d(3, 2, padding=1), written as an explicit -inf pad and a VALID pool:
            # the same numbers as padding=((1, 1), (1, 1)).
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
            x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        else:
            x = conv(self.num_filters, (3, 3), padding=1, name="conv_init")(x)
            x = self.act(norm(name="bn_init")(x))
        # Backpropagation keeps only the blocks' conv outputs (and inputs) and recomputes the
        # cheap BatchNorm and ReLU from them: less scratch memory, and with less memory traffic a
        # faster step (docs/measurements.md).
        block_cls = nn.remat(self.block_cls, policy=jax.checkpoint_policies.dots_saveable)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                x = block_cls(
                    self.num_filters * 2**i,
                    strides=(2, 2) if i > 0 and j == 0 else (1, 1),
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    shortcut=self.shortcut,
                    zero_init_last=self.zero_init_residual,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init, name="head")(x)
        return x.astype(jnp.float32)


class Residual(nn.Module):
    """ResNet-9's residual: x + two (3x3 conv + BN + act) of x's width; no activation after the sum."""

    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    zero_init_last: bool = False  # start the branch's last BN scale at 0

    @nn.compact
    def __call__(self, x):
        filters = x.shape[-1]
        y = self.conv(filters, (3, 3), padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(filters, (3, 3), padding=1, name="conv2")(y)
        y = self.act(last_norm(self, "bn2")(y))
        return x + y


class ResNet9(nn.Module):
    """David Page's ResNet-9 for NHWC images (his cifar10-fast dawn.py `net()`); returns float32 logits."""

    num_classes: int
    num_filters: int = 64  # the prep conv's width; layer1, layer2 and layer3 have 2x, 4x and 8x
    zero_init_residual: bool = False  # last BN scale of each residual branch starts at 0
    dtype: Any = jnp.float32  # computation dtype; params and BN statistics stay float32
    axis_name: Optional[str] = None  # the devices' axis to average BN statistics over (sync BN)
    bn_momentum: float = 0.9  # flax convention: torch's momentum=0.1
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = conv_and_norm(self, train)

        def conv_bn(x, filters, name):
            x = conv(filters, (3, 3), padding=1, name=f"{name}_conv")(x)
            return self.act(norm(name=f"{name}_bn")(x))

        x = conv_bn(x.astype(self.dtype), self.num_filters, "prep")
        # The residuals are not rematerialised as ResNet's blocks are: the 32x32 prep and layer1
        # outputs dominate the train step's scratch memory, so nn.remat saves none of it and is no
        # faster (docs/measurements.md).
        for i, residual in enumerate((True, False, True), start=1):  # Page's res_layers: layer1, layer3
            x = conv_bn(x, self.num_filters * 2**i, f"layer{i}")
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            if residual:
                x = Residual(
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    zero_init_last=self.zero_init_residual,
                    name=f"layer{i}_residual",
                )(x)
        x = jnp.max(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=dense_kernel_init, name="head")(x)
        return x.astype(jnp.float32) * 0.125  # Page's fixed logit scale, his Mul(weight=0.125)


WHITENING_EPS = 5e-4  # airbench's init_whitening_conv eps


def whitening_kernel(images: np.ndarray, kernel_size: int = 2, eps: float = WHITENING_EPS) -> np.ndarray:
    """airbench's whitening conv kernel (HWIO) for normalised NHWC `images`: the eigenvectors of
    the uncentred second moment (X^T X / n) of every stride-1 `kernel_size` patch, largest
    eigenvalue first, each scaled by 1 / sqrt(eigenvalue + eps), then the same negated.
    Accumulated in float64 over chunks, so the result does not depend on the device."""
    channels = images.shape[-1]
    size = kernel_size * kernel_size * channels
    moment, count = np.zeros((size, size)), 0
    for chunk in np.array_split(images, max(1, len(images) // 500)):
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (kernel_size, kernel_size), axis=(1, 2))
        # (n, h, w, c, kh, kw) -> rows of (kh, kw, c): an HWIO kernel's input order.
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, size).astype(np.float64)
        moment += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(moment / count)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    scaled = eigenvectors / np.sqrt(eigenvalues + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1)
    return kernel.reshape(kernel_size, kernel_size, channels, 2 * size).astype(np.float32)


def gelu(x):
    """Exact GELU in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)): on the CPU a quarter of the
    train step faster than flax's erfc form (docs/measurements.md)."""
    return 0.5 * x * (1 + jax.lax.erf(x * 0.7071067811865476))


def max_pool(x, size: int):
    """PyTorch's MaxPool2d(size): non-overlapping windows, the remainder rows and columns
    dropped. A reshape and a max, whose gradient XLA:CPU computes faster than nn.max_pool's
    select-and-scatter (a tie shares the gradient where PyTorch gives it to the first)."""
    n, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size]
    return x.reshape(n, h // size, size, w // size, size, c).max(axis=(2, 4))


class Airbench(nn.Module):
    """airbench's network (its `make_net93` / `make_net94`) for NHWC images; returns float32 logits.

    BatchNorm has no learned scale (airbench fixes it at 1), epsilon 1e-12 and momentum 0.6 in
    flax's convention (airbench hands PyTorch 1 - 0.6). GELU is exact (erf), as PyTorch's.
    The `whiten` kernel starts as PyTorch's default; `whitening_kernel` of the training images
    replaces it (`train.Setup.initialised`), and the recipes never train it (`config.param_rules`).
    """

    num_classes: int
    widths: Sequence[int] = (64, 256, 256)  # the three groups' widths
    zero_init_residual: bool = False  # unused: there is no residual
    dtype: Any = jnp.float32  # computation dtype; params and BN statistics stay float32
    axis_name: Optional[str] = None  # the devices' axis to average BN statistics over (sync BN)
    bn_momentum: float = 0.6
    act: Callable = gelu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=dirac(torch_default_kernel_init)
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            use_scale=False,
            momentum=self.bn_momentum,
            epsilon=1e-12,
            dtype=self.dtype,
            axis_name=self.axis_name if train else None,
        )
        x = conv(WHITEN_WIDTH, (2, 2), padding="VALID", use_bias=True, name="whiten")(x.astype(self.dtype))
        x = self.act(x)
        for i, width in enumerate(self.widths, start=1):
            x = conv(width, (3, 3), padding=1, name=f"group{i}_conv1")(x)
            x = self.act(norm(name=f"group{i}_norm1")(max_pool(x, 2)))
            x = conv(width, (3, 3), padding=1, name=f"group{i}_conv2")(x)
            x = self.act(norm(name=f"group{i}_norm2")(x))
        x = max_pool(x, 3).reshape(x.shape[0], -1)
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=dense_kernel_init, name="head")(x)
        return x.astype(jnp.float32) / 9.0  # airbench's Mul(1/9)


WHITEN_WIDTH = 24  # 2 x the 12 values of a 2x2x3 patch: each eigenvector and its negative
Airbench93 = functools.partial(Airbench, widths=(64, 128, 128))
Airbench94 = functools.partial(Airbench, widths=(64, 256, 256))

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)

_CIFAR = dict(block_cls=BasicBlock, num_filters=16, stem="cifar", shortcut="zero_pad")
ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), **_CIFAR)
ResNet32 = functools.partial(ResNet, stage_sizes=(5, 5, 5), **_CIFAR)
ResNet44 = functools.partial(ResNet, stage_sizes=(7, 7, 7), **_CIFAR)
ResNet56 = functools.partial(ResNet, stage_sizes=(9, 9, 9), **_CIFAR)
ResNet110 = functools.partial(ResNet, stage_sizes=(18, 18, 18), **_CIFAR)

# Tiny network for tests and the smoke config.
ResNet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), **_CIFAR)

# The stems of `ResNet` and the models whose stem is configurable (the He et al. CIFAR nets
# always use a 3x3 conv, ResNet-9 its own prep conv).
STEMS = ("cifar", "imagenet")
STEM_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FIXED_WIDTH_MODELS = ("airbench93", "airbench94")  # no num_filters

MODELS = {
    "airbench93": Airbench93,
    "airbench94": Airbench94,
    "resnet8": ResNet8,
    "resnet9": ResNet9,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet34": ResNet34,
    "resnet44": ResNet44,
    "resnet50": ResNet50,
    "resnet56": ResNet56,
    "resnet101": ResNet101,
    "resnet110": ResNet110,
    "resnet152": ResNet152,
}


def get_model(name: str, *, num_classes: int, **overrides) -> nn.Module:
    """Builds the registered model `name`; `overrides` replace any of its fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **overrides)


def num_params(params) -> int:
    """Total number of parameters in a params tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
