"""Host batching and on-device augmentation.

Shuffling and batching are index arithmetic over the split held in host memory: the batch
at a step is a pure function of the seed and the step, so a restored run sees exactly the
batches an uninterrupted one would. Each process builds only its rows of every global
batch (`part`, which the device layout chooses: `parallel.process_slice`), and batches stay
uint8 until they reach the devices. Augmentation (random crop, flip, Cutout) and
normalisation run on the device, inside the compiled train step, with each example's
randomness drawn from (seed, step, its position in the global batch), whatever the device
layout.
"""

import functools
from typing import Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = {"reflect": "reflect", "zero": "constant"}  # data.padding_mode -> jnp.pad mode
NORMALIZATIONS = ("dataset", "half")

# ---------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the global train batch at `step`: epoch `e` reads permutation (seed, e)
    in order and drops its remainder."""
    steps_per_epoch = num_examples // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    return _permutation(seed, epoch, num_examples)[i * batch_size : (i + 1) * batch_size]


def train_batch(images, labels, step: int, *, batch_size: int, seed: int, part: slice = slice(None)) -> dict:
    """Rows `part` of the global train batch at `step`.

    `position` is each example's index in the global batch: augmentation draws from it.
    """
    idx = train_indices(step, num_examples=len(images), batch_size=batch_size, seed=seed)[part]
    return {"image": images[idx], "label": labels[idx], "position": np.arange(batch_size, dtype=np.int32)[part]}


def train_batches(
    images, labels, steps: range, *, batch_size: int, seed: int, part: slice = slice(None)
) -> Iterator[dict]:
    """`train_batch` of each of `steps`, in order."""
    for step in steps:
        yield train_batch(images, labels, step, batch_size=batch_size, seed=seed, part=part)


def eval_batches(images, labels, *, batch_size: int, part: slice = slice(None)) -> Iterator[dict]:
    """Rows `part` of global batches that hold every example exactly once, in order; the last
    is padded and `mask` marks the real examples (1) from the padding (0)."""
    for start in range(0, len(images), batch_size):
        idx = np.arange(start, start + batch_size)[part]
        mask = idx < len(images)
        idx = np.where(mask, idx, 0)
        yield {"image": images[idx], "label": labels[idx], "mask": mask.astype(np.float32)}


# -------------------------------------------------------------------------- device side


def augment(
    key: jax.Array,
    images: jax.Array,
    positions: jax.Array,
    *,
    crop_padding: int = 4,
    padding_mode: str = "reflect",
    flip: bool = True,
    cutout: int = 0,
) -> Tuple[jax.Array, jax.Array]:
    """Random crop from the padded image and random horizontal flip, per example.

    Each example's draw comes from `fold_in(key, position)`. Returns the augmented uint8
    images and a float mask that is 0 where Cutout erases (apply it after normalising).
    """
    _, height, width, _ = images.shape
    mode = PADDING_MODES[padding_mode]
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)

    def one(position, image):
        k_crop, k_flip, k_cut = jax.random.split(jax.random.fold_in(key, position), 3)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(image, (dy, dx, 0), (height, width, image.shape[-1]))
        if flip:
            image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
        keep = jnp.ones((height, width, 1), jnp.float32)
        if cutout:
            cy, cx = jax.random.randint(k_cut, (2,), 0, jnp.array([height, width]))
            ys = jnp.arange(height)[:, None, None]
            xs = jnp.arange(width)[None, :, None]
            inside = (ys >= cy - cutout // 2) & (ys < cy - cutout // 2 + cutout)
            inside &= (xs >= cx - cutout // 2) & (xs < cx - cutout // 2 + cutout)
            keep = jnp.where(inside, 0.0, 1.0)
        return image, keep

    return jax.vmap(one)(positions, padded)


def normalization(data_config, dataset) -> Tuple[np.ndarray, np.ndarray]:
    """The (mean, std) to normalise uint8 pixels with, per `data.normalization`."""
    if data_config.normalization == "half":  # The tutorial's Normalize((0.5,) * 3, (0.5,) * 3).
        return np.full(3, 127.5, np.float32), np.full(3, 127.5, np.float32)
    return dataset.mean, dataset.std


def preprocess(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    dtype,
    *,
    key: Optional[jax.Array] = None,
    positions: Optional[jax.Array] = None,
    data_config=None,
) -> jax.Array:
    """uint8 images -> normalised `dtype` images; augmented when `key` is given."""
    keep = None
    if key is not None:
        images, keep = augment(
            key,
            images,
            positions,
            crop_padding=data_config.crop_padding,
            padding_mode=data_config.padding_mode,
            cutout=data_config.cutout,
        )
    x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if keep is not None and data_config.cutout:
        x = x * keep
    return x.astype(dtype)
