"""The offline tfds writer the tests and the device check build their data sets with."""

import subprocess
import sys

import numpy as np
import pytest

from configs import default
from conftest import CIFAR10_ARCHIVE, ROOT
from resnet_jax import tfds_writer
from resnet_jax.data import registry


def load(data_dir, name):
    config = default.get_config().data
    config.update(name=name, data_dir=str(data_dir), download=False)
    return registry.load_dataset(config)


def test_written_data_set_reads_back_exactly_through_the_tfds_pipeline(tmp_path):
    splits = tfds_writer.synthetic(10, {"train": 60, "test": 20}, seed=3)
    tfds_writer.write(str(tmp_path), "cifar10", splits, {"label": tfds_writer.CIFAR10_LABELS})
    dataset = load(tmp_path, "cifar10")
    np.testing.assert_array_equal(dataset.train_images, splits["train"]["image"])
    np.testing.assert_array_equal(dataset.test_labels, splits["test"]["label"])
    assert dataset.class_names == tfds_writer.CIFAR10_LABELS
    with pytest.raises(FileExistsError):
        tfds_writer.write(str(tmp_path), "cifar10", splits, {"label": tfds_writer.CIFAR10_LABELS})


def test_synthetic_cifar100_has_fine_and_coarse_labels(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_jax.tfds_writer",
            str(tmp_path),
            "--synthetic",
            "--name",
            "cifar100",
            "--train",
            "200",
            "--test",
            "100",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    dataset = load(tmp_path, "cifar100")
    assert dataset.num_classes == 100 and len(dataset.train_images) == 200
    assert np.bincount(dataset.test_labels).tolist() == [1] * 100
    info = (tmp_path / "cifar100" / "3.0.2" / "features.json").read_text()
    assert '"coarse_label"' in info and '"numClasses": "20"' in info


def test_balanced_subsets_take_every_class_equally():
    labels = np.repeat(np.arange(10), [50, 40, 30, 30, 30, 30, 30, 30, 30, 30])
    idx = tfds_writer.balanced(labels, 100, seed=0)
    assert len(set(idx)) == 100 and np.bincount(labels[idx]).tolist() == [10] * 10


@pytest.mark.skipif(not __import__("os").path.exists(CIFAR10_ARCHIVE), reason="no CIFAR-10 archive on this machine")
def test_archive_subset_is_real_cifar10(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_jax.tfds_writer",
            str(tmp_path),
            "--archive",
            CIFAR10_ARCHIVE,
            "--train",
            "100",
            "--test",
            "50",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    dataset = load(tmp_path, "cifar10")
    assert np.bincount(dataset.train_labels).tolist() == [10] * 10
    # Natural images, not the synthetic blocks: neighbouring pixels are strongly correlated.
    x = dataset.train_images.astype(np.float32)
    assert np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1] > 0.8
