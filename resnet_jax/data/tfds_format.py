"""CIFAR as tfds's own builders prepare it, without TensorFlow: the official binary archives
read into tfds's splits and order, and the array_record data set written as
`download_and_prepare(file_format="array_record")` leaves it, which `tfds.data_source` reads."""

import hashlib
import io
import json
import os
import tarfile
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

VERSION = "3.0.2"  # tfds's cifar10 and cifar100 versions
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHARDS = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # tfds's file name template, in dataset_info.json
SIDE = 32
# name: (URL, folder inside the archive, {split: files}, {label feature, in record order: its names file})
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
    """The record numbers of a split in the order tfds writes them: sorted by the md5 of the
    split's name followed by the number (tfds.core.hashing, the split as salt)."""
    salted = hashlib.md5(split.encode())

    def key(i):
        md5 = salted.copy()
        md5.update(str(i).encode())
        return int(md5.hexdigest(), 16)

    return np.asarray(sorted(range(num_examples), key=key), np.int64)


def read_official_archive(path: str, name: str) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Sequence[str]]]:
    """The splits of data set `name`'s official archive at `path` ({split: {"image", label features,
    "id"}}, in tfds's order) and each label feature's class names; ValueError if it is not one."""
    _, folder, files, label_files = ARCHIVES[name]
    width = len(label_files) + SIDE * SIDE * 3
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
        images = records[:, len(label_files) :].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # plane by plane
        splits[split] = {key: records[:, i].astype(np.int64) for i, key in enumerate(label_files)}
        splits[split].update(image=np.ascontiguousarray(images), id=[f"{split}_{i:05d}" for i in order])
    return splits, label_names


def _example(example_id: str, image: np.ndarray, labels: Dict[str, int]) -> bytes:
    """One serialised tf.Example, as tfds writes it: id, PNG-encoded image, int64 labels."""
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2 as pb  # protos only, no TensorFlow

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    feature = {
        "id": pb.Feature(bytes_list=pb.BytesList(value=[example_id.encode()])),
        "image": pb.Feature(bytes_list=pb.BytesList(value=[png.getvalue()])),
        **{key: pb.Feature(int64_list=pb.Int64List(value=[int(value)])) for key, value in labels.items()},
    }
    return tf_example_pb2.Example(features=pb.Features(feature=feature)).SerializeToString()


def write(data_dir: str, name: str, splits: Dict[str, dict], label_names: Dict[str, Sequence[str]]) -> str:
    """Writes `splits` ({split: {"image": (N, H, W, 3) uint8, label feature: (N,) ints, optionally
    "id"}}, ids by default "{split}_{position:05d}") as the tfds data set `name` in `data_dir`, in
    that order; `label_names` names each label feature's classes. Returns the version folder."""
    from array_record.python import array_record_module

    folder = os.path.join(data_dir, name, VERSION)
    if os.path.exists(os.path.join(folder, "dataset_info.json")):
        raise FileExistsError(f"{folder} already holds a data set; remove it first")
    os.makedirs(folder, exist_ok=True)
    split_infos = []
    for split, arrays in splits.items():
        n = len(arrays["image"])
        path = os.path.join(folder, f"{name}-{split}.array_record-00000-of-00001")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # tfds's own option
        num_bytes = 0
        ids = arrays.get("id", [f"{split}_{i:05d}" for i in range(n)])
        for i, image in enumerate(arrays["image"]):
            record = _example(ids[i], image, {k: arrays[k][i] for k in label_names})
            writer.write(record)
            num_bytes += len(record)
        writer.close()
        split_infos.append(
            {"filepathTemplate": SHARDS, "name": split, "numBytes": str(num_bytes), "shardLengths": [str(n)]}
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
        "description": f"{name}, written by resnet_jax.data.tfds_format",
        "location": {"urls": ["https://www.cs.toronto.edu/~kriz/cifar.html"]},
        "moduleName": "tensorflow_datasets.image_classification.cifar",
        "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "label"}]}},
    }
    features_dict = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
    for file, content in (
        ("dataset_info.json", info),
        ("features.json", {"featuresDict": {"features": features}, "pythonClassName": features_dict}),
    ):
        with open(os.path.join(folder, file), "w") as f:
            json.dump(content, f, indent=2)
    return folder
