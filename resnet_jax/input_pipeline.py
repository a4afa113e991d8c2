"""CIFAR input pipeline: tfds acquisition, in-memory host batching, on-device augmentation.

The split is read into host memory once as uint8. Shuffling and batching are index
arithmetic (the batch at a step is a pure function of the seed and the step, so a
restored run sees exactly the batches an uninterrupted one would), each process takes
its contiguous slice of every global batch, and batches are sent to the devices as
uint8. Augmentation (random crop, flip, Cutout) and normalisation run on the device,
inside the compiled train step, with each example's randomness drawn from
(seed, step, its position in the global batch), whatever the device layout.
"""

import dataclasses
import functools
import socket
import urllib.parse
from typing import Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import Error

_READ_CHUNK = 5000  # records decoded per call when reading an array_record split
_VALIDATION_SEED = 20161  # fixes which train examples are held out for validation, whatever config.seed

DATASETS = ("cifar10", "cifar100", "folder")
PADDING_MODES = {"reflect": "reflect", "zero": "constant"}  # data.padding_mode -> jnp.pad mode
NORMALIZATIONS = ("dataset", "half")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits of an image-classification data set, in host memory."""

    name: str
    class_names: Tuple[str, ...]
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: np.ndarray  # per-channel mean of the train split, in [0, 255]
    std: np.ndarray  # per-channel standard deviation of the train split
    validation_images: Optional[np.ndarray] = None  # held out of train (data.validation_examples); None: none
    validation_labels: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_splits(self):
        """(name, images, labels) of every split evaluation reports: validation (if held out), then test."""
        if self.validation_images is not None:
            yield "validation", self.validation_images, self.validation_labels
        yield "test", self.test_images, self.test_labels


def validation_indices(labels: np.ndarray, num_examples: int, num_classes: int) -> np.ndarray:
    """The `num_examples` train indices held out for validation, sorted: class-balanced (the
    first `num_examples % num_classes` classes get one more) and the same on every run and
    device layout: each class's first ones in a permutation drawn from a fixed seed."""
    order = np.random.default_rng(_VALIDATION_SEED).permutation(len(labels))
    chosen = []
    for c in range(num_classes):
        wanted = num_examples // num_classes + (c < num_examples % num_classes)
        members = order[labels[order] == c][:wanted]
        if len(members) < wanted:
            raise Error(
                f"--config.data.validation_examples={num_examples} asks for {wanted} examples of class {c}, "
                f"but the train split has {len(members)}; hold out fewer"
            )
        chosen.append(members)
    return np.sort(np.concatenate(chosen))


def hold_out_validation(dataset: Dataset, num_examples: int) -> Dataset:
    """`dataset` with `num_examples` of its train examples moved to a validation split (and the
    normalisation statistics computed from what remains for training)."""
    if not num_examples:
        return dataset
    held = validation_indices(dataset.train_labels, num_examples, dataset.num_classes)
    keep = np.ones(len(dataset.train_labels), bool)
    keep[held] = False
    train_images = dataset.train_images[keep]
    mean, std = channel_stats(train_images)
    return dataclasses.replace(
        dataset,
        train_images=train_images,
        train_labels=dataset.train_labels[keep],
        validation_images=dataset.train_images[held],
        validation_labels=dataset.train_labels[held],
        mean=mean,
        std=std,
    )


def load_dataset(data_config) -> Dataset:
    """Loads `data_config.name` from tfds, preparing it first if needed (and allowed), or
    the image folder `data_config.folder` when the name is "folder"; then holds out
    `data_config.validation_examples` of the train split for validation."""
    if data_config.name == "folder":
        from resnet_jax import image_folder

        dataset = image_folder.load(data_config)
    else:
        dataset = _load_tfds(data_config)
    return hold_out_validation(dataset, data_config.validation_examples)


def _load_tfds(data_config) -> Dataset:
    import tensorflow_datasets as tfds  # Imported here: it is slow and only needed here.

    try:
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends.
        raise Error(f"cannot open tfds data set {data_config.name!r}: {_first_line(e)}") from None
    if not builder.is_prepared():
        _download_and_prepare(builder, data_config)
    splits = {}
    for split in ("train", "test"):
        images, labels = _read_split(builder, split)
        splits[split] = (images, labels)
    train_images = splits["train"][0]
    mean, std = channel_stats(train_images)
    return Dataset(
        name=data_config.name,
        class_names=tuple(builder.info.features["label"].names),
        train_images=train_images,
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        mean=mean,
        std=std,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _missing_message(builder, why: str) -> str:
    return (
        f"data set {builder.name} {builder.version} is not prepared in {builder.data_dir} and {why}. "
        f"Fix: point --config.data.data_dir at a folder holding a prepared copy "
        f"({builder.name}/{builder.version}/), or prepare it on a machine with network "
        f"(the same command) and copy that folder here"
    )


def download_host_reachable(url: str, timeout: float = 5.0) -> Optional[str]:
    """Returns None if the host of `url` accepts a TCP connection, else why it does not."""
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port} unreachable: {_first_line(e)}"


def _download_and_prepare(builder, data_config) -> None:
    """Runs tfds's download_and_prepare, failing fast (not hanging) without network."""
    if not data_config.download:
        raise Error(_missing_message(builder, "data.download is False"))
    # tfds retries for minutes when offline; a short connection probe finds out at once.
    unreachable = download_host_reachable(builder.info.homepage)
    if unreachable:
        raise Error(_missing_message(builder, f"cannot be downloaded ({unreachable})"))
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:
        raise Error(_missing_message(builder, f"preparing it failed: {_first_line(e)}")) from None


def _read_split(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a whole split as (uint8 images, int32 labels), checking its length."""
    import tensorflow_datasets as tfds

    where = f"{builder.data_path}"
    try:
        expected = builder.info.splits[split].num_examples
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            # Random access through tfds.data_source: no TensorFlow needed.
            source = builder.as_data_source(split=split)
            images, labels = [], []
            for start in range(0, len(source), _READ_CHUNK):
                records = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
                images.extend(r["image"] for r in records)
                labels.extend(r["label"] for r in records)
            images, labels = np.stack(images), np.asarray(labels)
        else:  # The older tfrecord format (an existing ~/tensorflow_datasets, gs://): needs TF.
            data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            images, labels = data["image"], data["label"]
    except Error:
        raise
    except Exception as e:
        raise Error(
            f"cannot read the {split} split of {builder.name} in {where}: {_first_line(e)}. "
            f"The files are unreadable, truncated or corrupt: fix the permissions or prepare the data set again"
        ) from None
    if len(images) != expected:
        raise Error(
            f"the {split} split in {where} holds {len(images)} examples, its metadata says {expected}: "
            f"the files are truncated or corrupt; prepare the data set again"
        )
    return images.astype(np.uint8), labels.astype(np.int32)


def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 255]."""
    flat = images.reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[-1])
    total_sq = np.zeros(flat.shape[-1])
    for start in range(0, len(flat), 1 << 22):  # Chunks keep the float copies small.
        chunk = flat[start : start + (1 << 22)].astype(np.float64)
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    mean = total / len(flat)
    return mean.astype(np.float32), np.sqrt(total_sq / len(flat) - mean**2).astype(np.float32)


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


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous part of every global batch."""
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def shard(x: np.ndarray, num_devices: int) -> np.ndarray:
    """Adds the leading local-device axis that `jax.pmap` maps over."""
    return x.reshape((num_devices, -1) + x.shape[1:])


def train_batch(
    images: np.ndarray,
    labels: np.ndarray,
    step: int,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_devices: int = 1,
) -> dict:
    """This process's part of the train batch at `step`, sharded over its `num_devices`.

    `position` is each example's index in the global batch: augmentation draws from it.
    """
    mine = process_slice(batch_size, process_index, process_count)
    idx = train_indices(step, num_examples=len(images), batch_size=batch_size, seed=seed)[mine]
    batch = {
        "image": images[idx],
        "label": labels[idx],
        "position": np.arange(batch_size, dtype=np.int32)[mine],
    }
    return {k: shard(v, num_devices) for k, v in batch.items()}


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_devices: int = 1,
) -> Iterator[dict]:
    """Every example exactly once, in order; the last global batch is padded and `mask`
    marks the real examples (1) from the padding (0)."""
    mine = process_slice(batch_size, process_index, process_count)
    for start in range(0, len(images), batch_size):
        idx = np.arange(start, start + batch_size)[mine]
        mask = idx < len(images)
        idx = np.where(mask, idx, 0)
        batch = {"image": images[idx], "label": labels[idx], "mask": mask.astype(np.float32)}
        yield {k: shard(v, num_devices) for k, v in batch.items()}


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


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


def normalization(data_config, dataset: Dataset) -> Tuple[np.ndarray, np.ndarray]:
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
