"""The model zoo in Flax linen, NHWC images to float32 logits (README.md): He et al.'s ImageNet (v1.5) and
CIFAR ResNets in one `ResNet` module, whose shortcuts have their own layers (the tutorial's reuse
`conv1`), David Page's ResNet-9 and Keller Jordan's airbench networks. BatchNorm's running statistics
live in `batch_stats`, updated only when `train=True` and the collection is mutable."""

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Kaiming-normal, fan_out, ReLU gain: torch.nn.init.kaiming_normal_(w, mode="fan_out").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's and Conv2d's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_and_norm(model: nn.Module, train: bool, kernel_init=conv_kernel_init, epsilon=1e-5, use_scale=True):
    """The layers every model is built from: a bias-free conv and a BatchNorm that compute in
    `model.dtype`; when training, BatchNorm averages its statistics over `model.axis_name`."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=model.dtype, kernel_init=kernel_init)
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        use_scale=use_scale,
        momentum=model.bn_momentum,
        epsilon=epsilon,
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


def last_norm(block, name):
    """The last BatchNorm of a residual branch, starting at scale 0 with `zero_init_last`."""
    if block.zero_init_last:
        return block.norm(name=name, scale_init=nn.initializers.zeros_init())
    return block.norm(name=name)


def residual_sum(block, x, y):
    """act(x + y), x through `block`'s shortcut where the shapes differ: a projection (1x1 conv + BN) or option A."""
    if x.shape != y.shape:
        if block.shortcut == "zero_pad":
            x = zero_pad_shortcut(x, y.shape[-1], block.strides)
        else:
            x = block.norm(name="proj_bn")(block.conv(y.shape[-1], (1, 1), block.strides, name="proj_conv")(x))
    return block.act(x + y)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (expansion 1)."""

    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: Tuple[int, int] = (1, 1)
    shortcut: str = "projection"  # or "zero_pad" (option A, no parameters)
    zero_init_last: bool = False  # start the branch's last BN scale at 0
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        return residual_sum(self, x, last_norm(self, "bn2")(y))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        return residual_sum(self, x, last_norm(self, "bn3")(y))


class ResNet(nn.Module):
    """ResNet v1 for NHWC images; returns float32 logits."""

    stage_sizes: Sequence[int]
    block_cls: Any
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
        kernel, strides, padding = ((7, 7), (2, 2), 3) if self.stem == "imagenet" else ((3, 3), (1, 1), 1)
        x = conv(self.num_filters, kernel, strides, padding=padding, name="conv_init")(x.astype(self.dtype))
        x = self.act(norm(name="bn_init")(x))
        if self.stem == "imagenet":
            # torch's MaxPool2d(3, 2, padding=1), written as an explicit -inf pad and a VALID pool:
            # the same numbers as padding=((1, 1), (1, 1)).
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
            x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        # Backpropagation keeps only the blocks' conv outputs (and inputs) and recomputes the
        # cheap BatchNorm and ReLU from them: less scratch memory, and with less memory traffic a
        # faster step (docs/measurements.md).
        block = functools.partial(
            nn.remat(self.block_cls, policy=jax.checkpoint_policies.dots_saveable),
            conv=conv,
            norm=norm,
            act=self.act,
            shortcut=self.shortcut,
            zero_init_last=self.zero_init_residual,
        )
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = block(self.num_filters * 2**i, strides=strides, name=f"stage{i + 1}_block{j + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_kernel_init, name="head")(x)
        return x.astype(jnp.float32)


class Residual(nn.Module):
    """ResNet-9's residual: x + two (3x3 conv + BN + act) of x's width; no activation after the sum."""

    conv: Any
    norm: Any
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
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: Optional[str] = None
    bn_momentum: float = 0.9
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
                x = Residual(conv, norm, self.act, self.zero_init_residual, name=f"layer{i}_residual")(x)
        x = jnp.max(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=torch_kernel_init, name="head")(x)
        return x.astype(jnp.float32) * 0.125  # Page's fixed logit scale, his Mul(weight=0.125)


def whitening_kernel(images: np.ndarray, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
    """airbench's `init_whitening_conv` kernel (HWIO) for normalised NHWC `images`: the eigenvectors of the
    uncentred second moment (X^T X / n) of every stride-1 `kernel_size` patch, largest eigenvalue first, each
    scaled by 1 / sqrt(eigenvalue + eps), then negated. Float64 over chunks: the same on every device."""
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


WHITEN_WIDTH = 24  # 2 x the 12 values of a 2x2x3 patch: each eigenvector and its negative


class Airbench(nn.Module):
    """airbench's network (its `make_net93` / `make_net94`) for NHWC images; returns float32 logits.
    Its BatchNorm has no scale, epsilon 1e-12 and momentum 0.6 as flax counts it; `whitening_kernel`
    of the training images replaces the `whiten` kernel's init (`train.Setup.initialised`)."""

    num_classes: int
    widths: Sequence[int] = (64, 256, 256)  # the three groups' widths
    zero_init_residual: bool = False  # unused: there is no residual
    dtype: Any = jnp.float32
    axis_name: Optional[str] = None
    bn_momentum: float = 0.6
    act: Callable = gelu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = conv_and_norm(self, train, dirac(torch_kernel_init), epsilon=1e-12, use_scale=False)
        x = self.act(conv(WHITEN_WIDTH, (2, 2), padding="VALID", use_bias=True, name="whiten")(x.astype(self.dtype)))
        for i, width in enumerate(self.widths, start=1):
            x = conv(width, (3, 3), padding=1, name=f"group{i}_conv1")(x)
            x = self.act(norm(name=f"group{i}_norm1")(max_pool(x, 2)))
            x = conv(width, (3, 3), padding=1, name=f"group{i}_conv2")(x)
            x = self.act(norm(name=f"group{i}_norm2")(x))
        x = max_pool(x, 3).reshape(x.shape[0], -1)
        x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=torch_kernel_init, name="head")(x)
        return x.astype(jnp.float32) / 9.0  # airbench's Mul(1/9)


# The stems of `ResNet` and the models whose stem is configurable (the He et al. CIFAR nets
# always use a 3x3 conv, ResNet-9 its own prep conv).
STEMS = ("cifar", "imagenet")
STEM_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FIXED_WIDTH_MODELS = ("airbench93", "airbench94")  # no num_filters

_CIFAR = dict(block_cls=BasicBlock, num_filters=16, stem="cifar", shortcut="zero_pad")
MODELS = {
    "airbench93": functools.partial(Airbench, widths=(64, 128, 128)),
    "airbench94": functools.partial(Airbench, widths=(64, 256, 256)),
    "resnet8": functools.partial(ResNet, stage_sizes=(1, 1, 1), **_CIFAR),  # tiny: tests and the smoke config
    "resnet9": ResNet9,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), **_CIFAR),
    "resnet32": functools.partial(ResNet, stage_sizes=(5, 5, 5), **_CIFAR),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet44": functools.partial(ResNet, stage_sizes=(7, 7, 7), **_CIFAR),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
    "resnet56": functools.partial(ResNet, stage_sizes=(9, 9, 9), **_CIFAR),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck),
    "resnet110": functools.partial(ResNet, stage_sizes=(18, 18, 18), **_CIFAR),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck),
}


def get_model(name: str, *, num_classes: int, **overrides) -> nn.Module:
    """Builds the registered model `name`; `overrides` replace any of its fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **overrides)


def num_params(params) -> int:
    """Total number of parameters in a params tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
