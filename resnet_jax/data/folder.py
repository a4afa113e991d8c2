"""`data.name = "folder"`: your own images in tfds's ImageFolder layout, DIR/{train,test}/<class>/
*.png|jpg|jpeg, each decoded once by `images.load_image` (docs/data.md)."""

import os
from typing import List, Tuple

import numpy as np

from resnet_jax.data import dataset, images
from resnet_jax.errors import Error

EXTENSIONS = (".png", ".jpg", ".jpeg")  # what tfds's ImageFolder reads, too


def _class_folders(root: str, split: str) -> List[str]:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise Error(f"image folder {root} has no {split}/ folder; it needs {split}/<class>/<image files> (PNG or JPEG)")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if not classes:
        raise Error(f"image folder {folder} holds no class folders; put each class's images in {folder}/<class>/")
    return classes


def _image_files(folder: str) -> List[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(EXTENSIONS) and not n.startswith("."))
    if not names:
        raise Error(f"class folder {folder} holds no images (.png, .jpg or .jpeg); add some or remove the folder")
    return [os.path.join(folder, n) for n in names]


def _decode(path: str, size: int) -> np.ndarray:
    try:
        return images.load_image(path, size)
    except Error as e:
        raise Error(f"cannot use image {path}: {e}; fix or remove the file") from None


def read_split(root: str, split: str, names, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, size, size, 3), int32 labels) of `root/split`, in class then file order.
    One thread: more do not decode faster (docs/data.md)."""
    paths, labels = [], []
    for label, name in enumerate(names):
        files = _image_files(os.path.join(root, split, name))
        paths += files
        labels += [label] * len(files)
    return np.stack([_decode(p, size) for p in paths]), np.asarray(labels, np.int32)


def class_names(root: str) -> Tuple[str, ...]:
    """The class folder names of `root`, sorted (label i is the i-th); the same in both splits or an Error."""
    if not os.path.isdir(root):
        raise Error(f"--config.data.folder={root!r} is not a folder; it needs train/<class>/ and test/<class>/ images")
    train, test = (_class_folders(root, split) for split in dataset.SPLITS)
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise Error(
            f"the class folders of {os.path.join(root, 'train')} and {os.path.join(root, 'test')} differ "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'}); "
            f"both splits need the same classes"
        )
    return tuple(train)


def load(data_config) -> dataset.Dataset:
    """The image folder `data_config.folder` as a Dataset."""
    names = class_names(data_config.folder)
    train, test = (read_split(data_config.folder, split, names, data_config.image_size) for split in dataset.SPLITS)
    return dataset.from_splits("folder", names, train, test)
