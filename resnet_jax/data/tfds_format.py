"""The on-disk tfds data set that `download_and_prepare(file_format="array_record")` leaves
(version folder, `dataset_info.json`, `features.json`, label files and one array_record
shard per split), written without TensorFlow: `tfds.data_source` and `registry.load_dataset`
read it as they read tfds's own."""

import io
import json
import os
from typing import Dict, Sequence

import numpy as np
from PIL import Image

VERSION = "3.0.2"  # tfds's cifar10 and cifar100 versions
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
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
    """Writes `splits` ({split: {"image": (N, H, W, 3) uint8, label feature: (N,) ints, optionally
    "id": (N,) str}}) as the tfds data set `name` in `data_dir`, in that order; `label_names`
    names each label feature's classes. Ids default to "{split}_{position:05d}". Returns the
    version folder."""
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
        ids = arrays.get("id", [f"{split}_{i:05d}" for i in range(len(arrays["image"]))])
        for i, image in enumerate(arrays["image"]):
            record = _example(ids[i], image, {k: arrays[k][i] for k in label_names})
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
        "description": f"{name}, written by resnet_jax.data.tfds_format",
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
