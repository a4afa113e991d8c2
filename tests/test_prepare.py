"""First-use preparation of CIFAR without TensorFlow: the official binary archive (a local copy
made from the JPEG archive, or what tfds's download manager fetched) -> the array_record data
set tfds's own builder writes, with the same ids, labels, pixels and order."""

import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from configs import default
from conftest import ROOT, cifar10_splits
from resnet_jax import tfds_writer
from resnet_jax.data import registry, tfds_format, tfds_source
from resnet_jax.errors import Error

SIZES = {"train": 100, "test": 30}


def write_official_archive(path: str, name: str, splits: dict, label_names: dict):
    """Writes `splits` ({split: {"image", label features}}, in file order) as data set `name`'s
    official archive at `path` (a .tar.gz): an offline stand-in for the download."""
    _, folder, files, label_files = tfds_format.ARCHIVES[name]

    def add(tar, file, data):
        info = tarfile.TarInfo(f"{folder}/{file}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        for key, file in label_files.items():
            add(tar, file, ("\n".join(label_names[key]) + "\n").encode())
        for split, split_files in files.items():
            arrays = splits[split]
            labels = [np.asarray(arrays[key], np.uint8)[:, None] for key in label_files]
            pixels = np.asarray(arrays["image"], np.uint8).transpose(0, 3, 1, 2).reshape(len(arrays["image"]), -1)
            records = np.concatenate([*labels, pixels], axis=1)
            for file, part in zip(split_files, np.array_split(records, len(split_files))):
                add(tar, file, part.tobytes())


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A cifar-10-binary.tar.gz holding real CIFAR-10 images, and the splits in file order."""
    splits = cifar10_splits(SIZES)
    path = str(tmp_path_factory.mktemp("official") / "cifar-10-binary.tar.gz")
    write_official_archive(path, "cifar10", splits, {"label": tfds_writer.CIFAR10_LABELS})
    return path, splits


def data_config(data_dir, **overrides):
    config = default.get_config().data
    config.update(name="cifar10", data_dir=str(data_dir), **overrides)
    return config


def test_the_order_is_tfds_own_hashing():
    from tensorflow_datasets.core import hashing  # tfds's hashing module needs no TensorFlow

    for split in ("train", "test"):
        hasher = hashing.Hasher(split)
        expected = sorted(range(500), key=hasher.hash_key)
        np.testing.assert_array_equal(tfds_format.tfds_order(split, 500), expected)


def test_the_archive_reads_back_in_tfds_order(official):
    path, splits = official
    read, label_names = tfds_format.read_official_archive(path, "cifar10")
    assert label_names == {"label": list(tfds_writer.CIFAR10_LABELS)}
    for split, arrays in splits.items():
        order = tfds_format.tfds_order(split, len(arrays["image"]))
        np.testing.assert_array_equal(read[split]["image"], arrays["image"][order])
        np.testing.assert_array_equal(read[split]["label"], arrays["label"][order])
        assert read[split]["id"][:2] == [f"{split}_{i:05d}" for i in order[:2]]


PREPARE_WITHOUT_TF = """
import importlib.util, json, sys
def tensorflow(name):
    return name.partition(".")[0] == "tensorflow"
class NoTensorFlow:  # as if TensorFlow were not installed: its import fails, find_spec finds nothing
    def find_spec(self, name, path=None, target=None):
        if tensorflow(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTensorFlow())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if tensorflow(name) else find_spec(name, package)
from configs import default
from resnet_jax.data import registry
config = default.get_config().data
config.update(name="cifar10", data_dir=sys.argv[1], archive=sys.argv[2], download=False)
dataset = registry.load_dataset(config)
print(json.dumps({"train": dataset.train_images.shape[0], "test": dataset.test_images.shape[0],
                  "tensorflow": "tensorflow" in sys.modules}))
"""


def test_preparation_needs_no_tensorflow_and_reads_back_in_tfds_order(official, tmp_path):
    path, splits = official
    done = subprocess.run(
        [sys.executable, "-c", PREPARE_WITHOUT_TF, str(tmp_path), path], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"train": 100, "test": 30, "tensorflow": False}
    assert sorted(os.listdir(tmp_path)) == ["cifar10"]  # nothing left aside
    dataset = registry.load_dataset(data_config(tmp_path, download=False))  # as prepared, now read
    order = tfds_format.tfds_order("train", 100)
    np.testing.assert_array_equal(dataset.train_images, splits["train"]["image"][order])
    np.testing.assert_array_equal(dataset.train_labels, splits["train"]["label"][order])
    assert dataset.class_names == tfds_writer.CIFAR10_LABELS


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tfds's own builder needs TensorFlow")
def test_the_same_records_as_tfds_own_builder(official, tmp_path, monkeypatch):
    """tfds's Cifar10 builder, given the same archive instead of the download, writes the same
    ids, labels and pixels, in the same order, as the TensorFlow-free preparation."""
    import tarfile

    import tensorflow_datasets as tfds

    path, _ = official
    extracted = tmp_path / "extracted"
    with tarfile.open(path) as tar:
        tar.extractall(extracted, filter="data")
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(extracted))
    builder = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record")
    theirs = [builder.as_data_source(split=s) for s in ("train", "test")]
    registry.load_dataset(data_config(tmp_path / "ours", archive=path, download=False))
    ours = [tfds.builder("cifar10", data_dir=str(tmp_path / "ours")).as_data_source(split=s) for s in ("train", "test")]
    for a, b in zip(theirs, ours):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x["id"], x["label"]) == (y["id"], y["label"])
            np.testing.assert_array_equal(x["image"], y["image"])


def test_the_download_goes_through_tfds_checksummed_manager(official, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    path, _ = official
    asked = []

    class Manager:
        def __init__(self, download_dir):
            asked.append(download_dir)

        def download(self, url):
            asked.append(url)
            return path

    monkeypatch.setattr(tfds.download, "DownloadManager", Manager)
    monkeypatch.setattr(tfds_source, "download_host_reachable", lambda url: None)
    dataset = registry.load_dataset(data_config(tmp_path))
    assert asked == [str(tmp_path / "downloads"), "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert dataset.train_images.shape == (100, 32, 32, 3)


def test_a_truncated_archive_is_one_line_and_leaves_nothing(official, tmp_path):
    path, _ = official
    data = open(path, "rb").read()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2])
    data_dir = tmp_path / "data"
    with pytest.raises(Error) as e:
        registry.load_dataset(data_config(data_dir, archive=str(broken)))
    assert "not cifar10's official archive" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(data_dir / "cifar10" / "3.0.2")


def test_the_core_install_requires_no_tensorflow():
    """pip reads these requirements: TensorFlow only in the export extra (SavedModel)."""
    names = {r: re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in importlib.metadata.requires("resnet-jax")}
    tensorflow = [r for r, name in names.items() if name in ("tensorflow", "tensorflow-cpu", "tensorflow_cpu")]
    assert tensorflow and all('extra == "export"' in r for r in tensorflow), tensorflow
