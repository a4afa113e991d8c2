"""data.name = "folder": your own images in train/<class>/ and test/<class>/ folders."""

import functools
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import smoke
from conftest import CIFAR10_ARCHIVE, run_cli
from resnet_jax import config_checks, summary, tfds_writer
from resnet_jax.data import folder, registry
from resnet_jax.errors import Error


@functools.lru_cache(maxsize=1)
def cifar_test_jpegs(per_class: int = 400) -> dict:
    """{class: [JPEG bytes]}: the first `per_class` real CIFAR-10 test images of each class, in
    archive order (the tfds data sets of conftest train on train images only); where there is no
    archive, the synthetic stand-ins'."""
    images = {}
    if not os.path.exists(CIFAR10_ARCHIVE):
        test = tfds_writer.synthetic(10, {"test": 10 * per_class}, seed=1)["test"]
        for image, label in zip(test["image"], test["label"]):
            jpeg = io.BytesIO()
            Image.fromarray(image).save(jpeg, format="JPEG", quality=90)
            images.setdefault(tfds_writer.CIFAR10_LABELS[label], []).append(jpeg.getvalue())
        return images
    with tarfile.open(CIFAR10_ARCHIVE, "r:xz") as tar:
        for member in tar:  # test/<class>/NNNN.jpg
            parts = member.name.split("/")
            if member.isfile() and member.name.endswith(".jpg") and parts[-3] == "test":
                if len(images.setdefault(parts[-2], [])) < per_class:
                    images[parts[-2]].append(tar.extractfile(member).read())
    return images


def make_folder(root, classes, train: int, test: int) -> str:
    """An image folder of real CIFAR-10 images: `train` and `test` JPEGs per class, none shared."""
    jpegs = cifar_test_jpegs()
    for name in classes:
        for split, chunk in (("train", jpegs[name][:train]), ("test", jpegs[name][train : train + test])):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i, data in enumerate(chunk):
                with open(os.path.join(root, split, name, f"{i:04d}.jpg"), "wb") as f:
                    f.write(data)
    return str(root)


def folder_config(folder, **data):
    config = smoke.get_config()
    config.data.name = "folder"
    config.data.folder = None if folder is None else str(folder)
    config.data.update(data)
    return config


def test_a_folder_loads_as_a_data_set(tmp_path):
    root = make_folder(tmp_path / "pets", ["dog", "cat"], train=6, test=3)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pets" / "train" / "dog" / "exact.PNG")
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    dataset = registry.load_dataset(folder_config(root).data)
    assert dataset.class_names == ("cat", "dog")  # sorted folder names
    assert dataset.train_images.shape == (13, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(dataset.train_labels, [0] * 6 + [1] * 7)
    np.testing.assert_array_equal(dataset.test_labels, [0] * 3 + [1] * 3)
    assert any(np.array_equal(image, pixels) for image in dataset.train_images)  # a 32x32 PNG is kept as is
    np.testing.assert_allclose(dataset.mean, dataset.train_images.reshape(-1, 3).mean(0), rtol=1e-5)
    small = registry.load_dataset(folder_config(root, image_size=20).data)
    assert small.train_images.shape == (13, 20, 20, 3)


@pytest.mark.parametrize("problem", ["no test split", "no classes", "classes differ", "empty class", "unreadable"])
def test_folder_mistakes_are_one_line_naming_the_path(tmp_path, problem):
    root = make_folder(tmp_path / "data", ["cat", "dog"], train=2, test=1)
    if problem == "no test split":
        os.rename(os.path.join(root, "test"), os.path.join(root, "tests"))
        expected = f"image folder {root} has no test/ folder"
    elif problem == "no classes":
        root = str(tmp_path / "empty")
        os.makedirs(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "test"))
        expected = f"image folder {os.path.join(root, 'train')} holds no class folders"
    elif problem == "classes differ":
        os.rename(os.path.join(root, "test", "dog"), os.path.join(root, "test", "horse"))
        expected = "only in train: ['dog']; only in test: ['horse']"
    elif problem == "empty class":
        os.makedirs(os.path.join(root, "train", "bird"))
        os.makedirs(os.path.join(root, "test", "bird"))
        expected = f"class folder {os.path.join(root, 'train', 'bird')} holds no images"
    else:
        with open(os.path.join(root, "test", "dog", "0000.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 truncated")
        expected = f"cannot use image {os.path.join(root, 'test', 'dog', '0000.jpg')}: "
    with pytest.raises(Error) as raised:
        registry.load_dataset(folder_config(root).data)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_the_cli_reports_a_folder_mistake_in_one_line(tmp_path):
    root = make_folder(tmp_path / "data", ["cat", "dog"], train=2, test=1)
    os.rename(os.path.join(root, "test", "dog"), os.path.join(root, "test", "horse"))
    result = run_cli(
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path / "run"),
        "--config.data.name=folder",
        f"--config.data.folder={root}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the class folders of {root}/train")
    assert "Traceback" not in result.stderr


def test_validation_needs_the_folder(tmp_path):
    config = folder_config(None)
    with pytest.raises(Error, match="data.name=folder needs --config.data.folder=DIR"):
        config_checks.validate(config, device_count=1)
    config = folder_config(tmp_path, image_size=0)
    with pytest.raises(Error, match="data.image_size must be positive"):
        config_checks.validate(config, device_count=1)


def test_summary_reads_only_the_class_names(tmp_path):
    root = make_folder(tmp_path / "data", ["bird", "frog", "ship"], train=1, test=1)
    text = summary.model_table(folder_config(root, image_size=24))
    assert "for folder (3 classes" in text and "per 24x24 image" in text
    assert folder.class_names(root) == ("bird", "frog", "ship")
