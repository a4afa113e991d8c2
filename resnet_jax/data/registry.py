"""The data sets `data.name` can name, and what the rest of the package knows of each before
loading it: its loader, its number of classes, its image shape and its split names.

A new tfds data set is one entry here (prepared beforehand unless it is CIFAR-10 or CIFAR-100,
which `tfds_source` prepares from their official archives); a new kind of source is also one
module beside `tfds_source` and `folder`. Config checks, `--mode summary` and training all read
this table.
"""

import dataclasses
from typing import Callable, Tuple

from resnet_jax.data import dataset, folder, tfds_source


@dataclasses.dataclass(frozen=True)
class Source:
    load: Callable  # (data_config, splits) -> dataset.Dataset, both splits in host memory
    num_classes: Callable  # data_config -> int, read without decoding any image
    image_shape: Callable  # data_config -> (height, width, channels) of the loaded images
    splits: Tuple[str, str] = dataset.SPLITS  # the split trained on, then the one evaluated


def _tfds(num_classes: int, image_shape: Tuple[int, int, int]) -> Source:
    """A tfds data set, whose number of classes and image shape are fixed."""
    return Source(load=tfds_source.load, num_classes=lambda _: num_classes, image_shape=lambda _: image_shape)


DATASETS = {
    "cifar10": _tfds(10, (32, 32, 3)),
    "cifar100": _tfds(100, (32, 32, 3)),
    "folder": Source(
        load=folder.load,
        num_classes=lambda data_config: len(folder.class_names(data_config.folder)),
        image_shape=lambda data_config: (data_config.image_size, data_config.image_size, 3),
    ),
}


def load_dataset(data_config) -> dataset.Dataset:
    """Loads `data_config.name` (a tfds data set, prepared first if needed and allowed, or the
    image folder `data_config.folder`), then holds out `data_config.validation_examples` of the
    train split for validation."""
    source = DATASETS[data_config.name]
    return dataset.hold_out_validation(source.load(data_config, source.splits), data_config.validation_examples)
