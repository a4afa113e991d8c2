"""The data sets `data.name` can name and what is known of each before loading it; config
checks, `--mode summary` and training read this table."""

import dataclasses
from typing import Callable, Tuple

from resnet_jax.data import dataset, folder, tfds_source


@dataclasses.dataclass(frozen=True)
class Source:
    load: Callable  # data_config -> dataset.Dataset, its train and test splits in host memory
    num_classes: Callable  # data_config -> int, read without decoding any image
    image_shape: Callable  # data_config -> (height, width, channels) of the loaded images


def _tfds(num_classes: int, image_shape: Tuple[int, int, int]) -> Source:
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
    """`data_config.name` loaded, `data_config.validation_examples` of its train split held out for validation."""
    return dataset.hold_out_validation(DATASETS[data_config.name].load(data_config), data_config.validation_examples)
