"""The in-memory data set every source loads into, its validation hold-out and its channel statistics."""

import dataclasses
from typing import Optional, Tuple

import numpy as np

from resnet_jax.errors import Error

SPLITS = ("train", "test")  # the splits a source reads: the one trained on, then the one evaluated
_VALIDATION_SEED = 20161  # fixes which train examples are held out for validation, whatever config.seed


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


def from_splits(name: str, class_names, train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray]):
    """A Dataset of (images, labels) train and test splits, with the train split's statistics."""
    return Dataset(name, tuple(class_names), *train, *test, *channel_stats(train[0]))


def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 255]."""
    flat = images.reshape(-1, images.shape[-1])
    total, total_sq = np.zeros(flat.shape[-1]), np.zeros(flat.shape[-1])
    for start in range(0, len(flat), 1 << 22):  # Chunks keep the float copies small.
        chunk = flat[start : start + (1 << 22)].astype(np.float64)
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    mean = total / len(flat)
    return mean.astype(np.float32), np.sqrt(total_sq / len(flat) - mean**2).astype(np.float32)


def validation_indices(labels: np.ndarray, num_examples: int, num_classes: int) -> np.ndarray:
    """The `num_examples` train indices held out for validation, sorted: each class's first ones
    in a fixed permutation (the first `num_examples % num_classes` classes give one more)."""
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
    """`dataset` with `num_examples` train examples moved to validation, statistics from the rest."""
    if not num_examples:
        return dataset
    held = validation_indices(dataset.train_labels, num_examples, dataset.num_classes)
    keep = np.ones(len(dataset.train_labels), bool)
    keep[held] = False
    rest = (dataset.train_images[keep], dataset.train_labels[keep])
    kept = from_splits(dataset.name, dataset.class_names, rest, (dataset.test_images, dataset.test_labels))
    return dataclasses.replace(
        kept, validation_images=dataset.train_images[held], validation_labels=dataset.train_labels[held]
    )
