"""Host batches, pure functions of (seed, step), each process building its rows (`part`) of the
uint8 global batch; augmentation, normalisation and the Mixup/CutMix draw on the device, from
(seed, step, position in the global batch) (docs/data.md; docs/training.md, "Mixup and CutMix")."""

import functools
from typing import Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = {"reflect": "reflect", "zero": "constant"}  # data.padding_mode -> jnp.pad mode
NORMALIZATIONS = ("dataset", "half")
FLIPS = ("random", "alternating")
CUTMIX_SHARE = 0.5  # with Mixup and CutMix both on, the chance a mixed batch is CutMix (timm's switch_prob)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=2)
def _run_flips(seed: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, 1]).random(num_examples) < 0.5  # A 3-word key: no epoch's permutation


def alternating_flips(indices: np.ndarray, step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """airbench's flip of the examples `indices` at `step`: one draw per example and run, inverted on odd epochs."""
    epoch = step // (num_examples // batch_size)
    return _run_flips(seed, num_examples)[indices] ^ bool(epoch % 2)


def train_indices(step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the global train batch at `step`: epoch `e` reads permutation (seed, e), its remainder dropped."""
    epoch, i = divmod(step, num_examples // batch_size)
    return _permutation(seed, epoch, num_examples)[i * batch_size : (i + 1) * batch_size]


def partner(positions: np.ndarray, batch_size: int) -> np.ndarray:
    """Each position's mix partner: its mirror in the global batch (timm's `batch.flip(0)`), whatever the layout."""
    return batch_size - 1 - positions


def train_batch(images, labels, step, *, batch_size, seed, part=slice(None), mix=False, alternating_flip=False) -> dict:
    """Rows `part` of the global train batch at `step`, each with its `position` in the global
    batch (augmentation draws from it); with `mix`, also its `partner`'s image, label and
    position; with `alternating_flip`, `flip` (and `partner_flip`): which rows to mirror."""
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
    for step in steps:
        yield train_batch(images, labels, step, **kwargs)


def eval_batches(images, labels, *, batch_size: int, part: slice = slice(None)) -> Iterator[dict]:
    """Rows `part` of global batches holding every example once, in order; `mask` is 0 on the last one's padding."""
    for start in range(0, len(images), batch_size):
        idx = np.arange(start, start + batch_size)[part]
        mask = idx < len(images)
        idx = np.where(mask, idx, 0)
        yield {"image": images[idx], "label": labels[idx], "mask": mask.astype(np.float32)}


def augment(key, images, positions, *, crop_padding: int = 4, padding_mode="reflect", cutout: int = 0, flips=None):
    """Random crop of the padded images and horizontal flip (random, or where `flips` says), drawn from
    `fold_in(key, position)`: uint8 images and a float mask, 0 where Cutout erases (applied after normalising)."""
    _, height, width, _ = images.shape
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=PADDING_MODES[padding_mode])

    def one(position, image, flip):
        k_crop, k_flip, k_cut = jax.random.split(jax.random.fold_in(key, position), 3)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(image, (dy, dx, 0), (height, width, image.shape[-1]))
        image = jnp.where(jax.random.bernoulli(k_flip) if flips is None else flip, image[:, ::-1], image)
        keep = jnp.ones((height, width, 1), jnp.float32)
        if cutout:
            y0, x0 = jax.random.randint(k_cut, (2,), 0, jnp.array([height, width])) - cutout // 2
            keep = jnp.where(_box(height, width, y0, y0 + cutout, x0, x0 + cutout), 0.0, 1.0)
        return image, keep

    return jax.vmap(one)(positions, padded, jnp.zeros(len(positions), bool) if flips is None else flips)


def _box(height: int, width: int, y0, y1, x0, x1) -> jax.Array:
    """(height, width, 1), True in rows [y0, y1) and columns [x0, x1)."""
    ys, xs = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def mix_weights(key, step, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float):
    """One batch's Mixup or CutMix (timm's per-batch mode), drawn from `fold_in(key, step)` alone
    so that every device draws the same: (lam, weight), the weights of each example's own label
    and of its own pixels, (height, width, 1); the partner's are 1 - either."""
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
    in_box = _box(height, width, y0, y1, x0, x1)
    lam = jnp.where(cutmix, 1.0 - (y1 - y0) * (x1 - x0) / (height * width), lam_mixup)
    weight = jnp.where(cutmix, jnp.where(in_box, 0.0, 1.0), jnp.broadcast_to(lam, (height, width, 1)))
    return lam.astype(jnp.float32), weight.astype(jnp.float32)


def normalization(data_config, dataset) -> Tuple[np.ndarray, np.ndarray]:
    """The (mean, std) to normalise uint8 pixels with, per `data.normalization`."""
    if data_config.normalization == "half":  # The tutorial's Normalize((0.5,) * 3, (0.5,) * 3).
        return np.full(3, 127.5, np.float32), np.full(3, 127.5, np.float32)
    return dataset.mean, dataset.std


def preprocess(images, mean, std, dtype, *, key=None, positions=None, flips=None, data_config=None) -> jax.Array:
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
