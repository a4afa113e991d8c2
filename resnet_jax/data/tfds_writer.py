"""Real-format tfds data sets written offline: what `download_and_prepare(file_format="array_record")`
leaves on disk (version folder, `dataset_info.json`, `features.json`, label files and one
array_record shard per split), readable by `registry.load_dataset` on a machine with no
network and no TensorFlow.

    python -m resnet_jax.tfds_writer DATA_DIR --archive cifar10_jpeg.tar.xz [--train N --test M]
    python -m resnet_jax.tfds_writer DATA_DIR --synthetic --train N --test M [--name cifar100]

`--archive` takes CIFAR-10's real images as JPEG folders (`train/<class>/*.jpg`,
`test/<class>/*.jpg`, in a .tar.xz or not). `--synthetic` draws learnable stand-ins (each
class a smooth colour pattern plus noise) for machines without the archive: the tests use
them there, so the suite runs anywhere the package is installed.
"""

import argparse
import io
import json
import os
import tarfile
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

VERSION = "3.0.2"  # tfds's cifar10 and cifar100 versions
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_COARSE = 20
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _example(example_id: str, image: np.ndarray, labels: Dict[str, int]) -> bytes:
    """One serialised tf.Example, as tfds writes it: id, PNG-encoded image, int64 labels."""
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2  # protos only, no TensorFlow

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    feature = {
        "id": tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[example_id.encode()])),
        "image": tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[png.getvalue()])),
    }
    for key, value in labels.items():
        feature[key] = tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[int(value)]))
    return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature)).SerializeToString()


def write(
    data_dir: str, name: str, splits: Dict[str, Dict[str, np.ndarray]], label_names: Dict[str, Sequence[str]]
) -> str:
    """Writes `splits` ({split: {"image": (N, H, W, 3) uint8, label feature: (N,) ints}}) as the
    tfds data set `name` in `data_dir`; `label_names` names each label feature's classes.
    Returns the version folder."""
    from array_record.python import array_record_module

    folder = os.path.join(data_dir, name, VERSION)
    if os.path.exists(os.path.join(folder, "dataset_info.json")):
        raise FileExistsError(f"{folder} already holds a data set; remove it first")
    os.makedirs(folder, exist_ok=True)
    split_infos = []
    for split, arrays in splits.items():
        path = os.path.join(folder, f"{name}-{split}.array_record-00000-of-00001")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # tfds's own option
        num_bytes = 0
        for i, image in enumerate(arrays["image"]):
            record = _example(f"{split}_{i:05d}", image, {k: arrays[k][i] for k in label_names})
            writer.write(record)
            num_bytes += len(record)
        writer.close()
        split_infos.append(
            {
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                "name": split,
                "numBytes": str(num_bytes),
                "shardLengths": [str(len(arrays["image"]))],
            }
        )
    shape = [str(d) for d in next(iter(splits.values()))["image"].shape[1:]]
    features = {
        "id": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}},
        "image": {
            "image": {"dtype": "uint8", "shape": {"dimensions": shape}},
            "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        },
    }
    for key, names in label_names.items():
        features[key] = {
            "classLabel": {"numClasses": str(len(names))},
            "pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
        }
        with open(os.path.join(folder, f"{key}.labels.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    info = {
        "name": name,
        "version": VERSION,
        "fileFormat": "array_record",
        "splits": split_infos,
        "description": f"{name}, written offline by resnet_jax.tfds_writer",
        "location": {"urls": [HOMEPAGE]},
        "moduleName": "tensorflow_datasets.image_classification.cifar",
        "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "label"}]}},
    }
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(folder, "features.json"), "w") as f:
        json.dump(
            {
                "featuresDict": {"features": features},
                "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            },
            f,
            indent=2,
        )
    return folder


def balanced(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of `limit` examples (0: all), shuffled and balanced over the classes (round-robin)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if not limit:
        return order
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    return np.stack([group[: min(map(len, by_class))] for group in by_class], 1).reshape(-1)[:limit]


def read_archive(archive: str, sizes: Dict[str, int], seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """CIFAR-10's images from JPEG folders `{train,test}/<class>/*.jpg` (a .tar.xz or a directory):
    `sizes[split]` class-balanced examples of each split (0: all), decoding only those."""
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
    """Learnable stand-in images: class c is a smooth random colour pattern plus pixel noise, and
    classes are balanced. With `coarse`, a `coarse_label` feature groups the classes."""
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="the tfds data_dir to write (NAME/3.0.2/ goes inside)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--archive", help="CIFAR-10 JPEG folders train/<class>/*.jpg, test/<class>/*.jpg (.tar.xz or a folder)"
    )
    source.add_argument("--synthetic", action="store_true", help="learnable stand-in images instead of real ones")
    parser.add_argument(
        "--name", default="cifar10", choices=("cifar10", "cifar100"), help="--synthetic only: the data set to imitate"
    )
    parser.add_argument(
        "--train", type=int, default=0, help="keep N train images, class-balanced (0: all; --synthetic: 5000)"
    )
    parser.add_argument(
        "--test", type=int, default=0, help="keep N test images, class-balanced (0: all; --synthetic: 1000)"
    )
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
            label_names = {
                "label": [f"class_{i}" for i in range(100)],
                "coarse_label": [f"superclass_{i}" for i in range(CIFAR100_COARSE)],
            }
    folder = write(args.data_dir, args.name, splits, label_names)
    print(f"wrote {folder}: " + ", ".join(f"{s}={len(a['image'])}" for s, a in splits.items()))


if __name__ == "__main__":
    main()
