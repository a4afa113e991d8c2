"""Writes a real-format tfds data set offline (`python -m resnet_jax.tfds_writer`), readable with
no network and no TensorFlow: CIFAR-10's images from JPEG folders (`--archive`) or learnable
stand-ins (`--synthetic`, which the tests use where the archive is missing)."""

import argparse
import io
import os
import tarfile
from typing import Dict, Optional

import numpy as np
from PIL import Image

from resnet_jax.data.tfds_format import CIFAR10_LABELS, write

CIFAR100_COARSE = 20


def balanced(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of `limit` examples (0: all), shuffled and balanced over the classes (round-robin)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if not limit:
        return order
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    return np.stack([group[: min(map(len, by_class))] for group in by_class], 1).reshape(-1)[:limit]


def read_archive(archive: str, sizes: Dict[str, int], seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """`sizes[split]` class-balanced examples (0: all) of each split of CIFAR-10's JPEG folders
    `{train,test}/<class>/*.jpg` (a .tar.xz or a directory), decoding only those."""
    found = {split: ([], []) for split in sizes}

    def add(member_name, read):
        split, label, _ = member_name.replace(os.sep, "/").split("/")[-3:]
        if split in found:
            found[split][0].append(read())
            found[split][1].append(CIFAR10_LABELS.index(label))

    if os.path.isdir(archive):
        for split in found:
            for label in CIFAR10_LABELS:
                for file in sorted(os.listdir(os.path.join(archive, split, label))):
                    path = os.path.join(archive, split, label, file)
                    add(path, lambda path=path: open(path, "rb").read())
    else:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    add(member.name, lambda member=member: tar.extractfile(member).read())
    splits = {}
    for offset, (split, (jpegs, labels)) in enumerate(found.items()):
        idx = balanced(np.asarray(labels), sizes[split], seed + offset)
        images = [np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB")) for i in idx]
        splits[split] = {"image": np.stack(images), "label": np.asarray(labels)[idx]}
    return splits


def synthetic(num_classes: int, sizes: Dict[str, int], seed: int = 0, coarse: Optional[int] = None):
    """Balanced learnable stand-ins: class c a smooth random colour pattern plus pixel noise; with
    `coarse`, a `coarse_label` feature groups the classes."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(30, 225, (num_classes, 4, 4, 3))
    templates = low.repeat(8, axis=1).repeat(8, axis=2)  # 8x8 blocks survive a 4-pixel crop shift
    splits = {}
    for split, n in sizes.items():
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        images = templates[labels] + rng.normal(0, 40, (n, 32, 32, 3))
        splits[split] = {"image": np.clip(images, 0, 255).astype(np.uint8), "label": labels}
        if coarse:
            splits[split]["coarse_label"] = labels % coarse
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", help="the tfds data_dir to write (NAME/3.0.2/ goes inside)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", help="CIFAR-10's JPEG folders {train,test}/<class>/*.jpg (.tar.xz or a folder)")
    source.add_argument("--synthetic", action="store_true", help="learnable stand-in images instead of real ones")
    parser.add_argument("--name", default="cifar10", choices=("cifar10", "cifar100"), help="--synthetic only")
    parser.add_argument("--train", type=int, default=0, help="N balanced train images (0: all; --synthetic: 5000)")
    parser.add_argument("--test", type=int, default=0, help="N balanced test images (0: all; --synthetic: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.archive:
        if args.name != "cifar10":
            parser.error("--archive holds CIFAR-10; --name cifar100 needs --synthetic")
        splits = read_archive(args.archive, {"train": args.train, "test": args.test}, args.seed)
        label_names = {"label": CIFAR10_LABELS}
    else:
        sizes = {"train": args.train or 5000, "test": args.test or 1000}
        if args.name == "cifar10":
            splits, label_names = synthetic(10, sizes, args.seed), {"label": CIFAR10_LABELS}
        else:
            splits = synthetic(100, sizes, args.seed, coarse=CIFAR100_COARSE)
            coarse = [f"superclass_{i}" for i in range(CIFAR100_COARSE)]
            label_names = {"label": [f"class_{i}" for i in range(100)], "coarse_label": coarse}
    folder = write(args.data_dir, args.name, splits, label_names)
    print(f"wrote {folder}: " + ", ".join(f"{s}={len(a['image'])}" for s, a in splits.items()))


if __name__ == "__main__":
    main()
