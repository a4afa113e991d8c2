"""Host batching and on-device augmentation.

Shuffling and batching are index arithmetic over the split held in host memory: the batch
at a step is a pure function of the seed and the step, so a restored run sees exactly the
batches an uninterrupted one would. Each process builds only its rows of every global
batch (`part`, which the device layout chooses: `parallel.process_slice`), and batches stay
uint8 until they reach the devices. Augmentation (random crop, flip, Cutout) and
normalisation run on the device, inside the compiled train step, with each example's
randomness drawn from (seed, step, its position in the global batch), whatever the device
layout. Mixup and CutMix pair each position with another of the global batch (`partner`,
on the host, which knows the whole batch) and draw one mix per batch from (seed, step)
(`mix_weights`, on the device).
"""

import functools
from typing import Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = {"reflect": "reflect", "zero": "constant"}  # data.padding_mode -> jnp.pad mode
NORMALIZATIONS = ("dataset", "half")
FLIPS = ("random", "alternating")
CUTMIX_SHARE = 0.5  # with Mixup and CutMix both on, the chance a mixed batch is CutMix (timm's switch_prob)

# ---------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=2)
def _run_flips(seed: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, 1]).random(num_examples) < 0.5  # A 3-word key: no epoch's permutation


def alternating_flips(indices: np.ndarray, step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """airbench's alternating flip of the examples `indices` at `step`: each example mirrored or
    not by one draw per run, then every example mirrored on odd epochs."""
    epoch = step // (num_examples // batch_size)
    return _run_flips(seed, num_examples)[indices] ^ bool(epoch % 2)


def train_indices(step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the global train batch at `step`: epoch `e` reads permutation (seed, e)
    in order and drops its remainder."""
    steps_per_epoch = num_examples // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    return _permutation(seed, epoch, num_examples)[i * batch_size : (i + 1) * batch_size]


def partner(positions: np.ndarray, batch_size: int) -> np.ndarray:
    """The global-batch position each position is mixed with: its mirror, as timm mixes a batch
    with `batch.flip(0)`. The batch is already a random draw of the epoch's permutation, so the
    pairs are random; no further draw is needed, every pair is mutual and every example is mixed
    once each way. Pairing over the global batch, not one device's rows, is what keeps a mixed
    pair the same on every device layout."""
    return batch_size - 1 - positions


def train_batch(
    images,
    labels,
    step: int,
    *,
    batch_size: int,
    seed: int,
    part: slice = slice(None),
    mix: bool = False,
    alternating_flip: bool = False,
) -> dict:
    """Rows `part` of the global train batch at `step`.

    `position` is each example's index in the global batch: augmentation draws from it. With
    `mix`, each row also carries its `partner`'s image, label and position, read here from the
    global batch's indices: the host holds the whole split, so no device needs another's rows,
    and the partner is augmented on the device by its own position, exactly as its own row is
    (the cost of the extra image: docs/measurements.md). With `alternating_flip`, `flip` (and
    `partner_flip`) say which rows to mirror (`alternating_flips`).
    """
    idx = train_indices(step, num_examples=len(images), batch_size=batch_size, seed=seed)
    positions = np.arange(batch_size, dtype=np.int32)[part]
    batch = {"image": images[idx[part]], "label": labels[idx[part]], "position": positions}
    flips = functools.partial(alternating_flips, step=step, num_examples=len(images), batch_size=batch_size, seed=seed)
    if alternating_flip:
        batch["flip"] = flips(idx[part])
    if mix:
        partners = partner(positions, batch_size)
        batch.update(
            partner_image=images[idx[partners]], partner_label=labels[idx[partners]], partner_position=partners
        )
        if alternating_flip:
            batch["partner_flip"] = flips(idx[partners])
    return batch


def train_batches(images, labels, steps: range, **kwargs) -> Iterator[dict]:
    """`train_batch` of each of `steps`, in order (`kwargs`: `train_batch`'s)."""
    for step in steps:
        yield train_batch(images, labels, step, **kwargs)


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
    cutout: int = 0,
    flips: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
    """Random crop from the padded image and horizontal flip, per example: random, or where
    `flips` (the host's `alternating_flips`) says.

    Each example's draw comes from `fold_in(key, position)`. Returns the augmented uint8
    images and a float mask that is 0 where Cutout erases (apply it after normalising).
    """
    _, height, width, _ = images.shape
    mode = PADDING_MODES[padding_mode]
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)

    def one(position, image, flip):
        k_crop, k_flip, k_cut = jax.random.split(jax.random.fold_in(key, position), 3)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(image, (dy, dx, 0), (height, width, image.shape[-1]))
        image = jnp.where(jax.random.bernoulli(k_flip) if flips is None else flip, image[:, ::-1], image)
        keep = jnp.ones((height, width, 1), jnp.float32)
        if cutout:
            cy, cx = jax.random.randint(k_cut, (2,), 0, jnp.array([height, width]))
            ys = jnp.arange(height)[:, None, None]
            xs = jnp.arange(width)[None, :, None]
            inside = (ys >= cy - cutout // 2) & (ys < cy - cutout // 2 + cutout)
            inside &= (xs >= cx - cutout // 2) & (xs < cx - cutout // 2 + cutout)
            keep = jnp.where(inside, 0.0, 1.0)
        return image, keep

    return jax.vmap(one)(positions, padded, jnp.zeros(len(positions), bool) if flips is None else flips)


def mix_weights(
    key: jax.Array, step, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float
) -> Tuple[jax.Array, jax.Array]:
    """One batch's Mixup or CutMix, timm's Mixup in its per-batch mode, drawn from
    `fold_in(key, step)` alone, so every device of every process draws the same one.

    Every batch is mixed (timm's mix_prob 1); with both alphas on, CutMix with probability
    CUTMIX_SHARE, else Mixup; lambda ~ Beta(alpha, alpha) of the chosen one; for CutMix a box of
    sides sqrt(1 - lambda) times the image's, centred anywhere and clipped to the image, and
    lambda corrected to the area left outside it. Returns (lam, weight): lam the weight of each
    example's own label (1: not mixed), weight (height, width, 1) that of its own pixels (lam
    everywhere for Mixup, 0 in the box and 1 outside for CutMix); the partner's are 1 - either.
    """
    _, k_choice, k_mixup, k_cutmix, k_box = jax.random.split(jax.random.fold_in(key, step), 5)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = jax.random.bernoulli(k_choice, CUTMIX_SHARE)
    else:
        cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    # timm's rand_bbox: the box's half sides, int(side * sqrt(1 - lambda)) // 2, about a random centre.
    ratio = jnp.sqrt(1.0 - lam_cutmix)
    half_h, half_w = (jnp.floor(side * ratio).astype(jnp.int32) // 2 for side in (height, width))
    cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([height, width]))
    y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    ys, xs = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    in_box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    lam = jnp.where(cutmix, 1.0 - (y1 - y0) * (x1 - x0) / (height * width), lam_mixup)
    weight = jnp.where(cutmix, jnp.where(in_box, 0.0, 1.0), jnp.broadcast_to(lam, (height, width, 1)))
    return lam.astype(jnp.float32), weight.astype(jnp.float32)


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
    flips: Optional[jax.Array] = None,
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
            flips=flips,
        )
    x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if keep is not None and data_config.cutout:
        x = x * keep
    return x.astype(dtype)
