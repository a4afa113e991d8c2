"""CIFAR's official binary archives (cifar-10-binary.tar.gz, cifar-100-binary.tar.gz), read
into the splits that tfds's own CIFAR builders write, in tfds's order, without TensorFlow.

Each record is its label bytes (CIFAR-10: the label; CIFAR-100: coarse, then fine) and
32x32x3 pixels stored plane by plane (all red, all green, all blue). tfds numbers a split's
records in file order (ids "train_00000", ...) and writes them sorted by the md5 of the
split's name followed by the number (tfds.core.hashing with the split as salt), so a data
set prepared here holds the same examples, ids and order as tfds.builder(...).download_and_prepare().
"""

import hashlib
import tarfile
from typing import Dict, Sequence, Tuple

import numpy as np

SIDE = 32
PIXELS = SIDE * SIDE * 3
# name: (URL, folder inside the archive, {split: files}, label features in record order and their names files)
ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "cifar-10-batches-bin",
        {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        {"label": "batches.meta.txt"},
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "cifar-100-binary",
        {"train": ["train.bin"], "test": ["test.bin"]},
        {"coarse_label": "coarse_label_names.txt", "label": "fine_label_names.txt"},
    ),
}


def tfds_order(split: str, num_examples: int) -> np.ndarray:
    """The record numbers of a split in the order tfds writes them."""
    salted = hashlib.md5(split.encode())

    def key(i):
        md5 = salted.copy()
        md5.update(str(i).encode())
        return int(md5.hexdigest(), 16)

    return np.asarray(sorted(range(num_examples), key=key), np.int64)


def read(path: str, name: str) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Sequence[str]]]:
    """The splits of the official archive of data set `name` at `path` ({split: {"image", label
    features, "id"}}, in tfds's order) and each label feature's class names. Raises ValueError
    when the archive is not that data set's official one."""
    _, folder, files, label_files = ARCHIVES[name]
    width = len(label_files) + PIXELS
    try:
        with tarfile.open(path) as tar:

            def member(file):
                return tar.extractfile(f"{folder}/{file}").read()

            label_names = {key: member(file).decode().split() for key, file in label_files.items()}
            raw = {split: b"".join(member(f) for f in split_files) for split, split_files in files.items()}
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not {name}'s official archive ({ARCHIVES[name][0]}): {e}") from None
    splits = {}
    for split, data in raw.items():
        if len(data) % width:
            raise ValueError(f"{path}: the {split} files are not whole {width}-byte records; the archive is truncated")
        records = np.frombuffer(data, np.uint8).reshape(-1, width)
        order = tfds_order(split, len(records))
        records = records[order]
        arrays = {key: records[:, i].astype(np.int64) for i, key in enumerate(label_files)}
        images = records[:, len(label_files) :].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        arrays["image"] = np.ascontiguousarray(images)
        arrays["id"] = [f"{split}_{i:05d}" for i in order]
        splits[split] = arrays
    return splits, label_names
