"""tfds data sets read whole into host memory as uint8 without TensorFlow (`tfds.data_source`);
CIFAR-10 and CIFAR-100 prepared on first use from their official archive (docs/data.md)."""

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from typing import Optional, Tuple

import numpy as np

from resnet_jax.data import dataset, tfds_format
from resnet_jax.errors import Error, first_line

_READ_CHUNK = 5000  # records decoded per call when reading an array_record split


def load(data_config) -> dataset.Dataset:
    """The tfds data set `data_config.name` in `data_config.data_dir`, prepared first if needed and allowed."""
    builder = _builder(data_config)
    if not builder.is_prepared():
        _prepare(builder, data_config)
        builder = _builder(data_config)  # re-read: the builder of an unprepared data set has no splits
    train, test = (_read_split(builder, split) for split in dataset.SPLITS)
    return dataset.from_splits(data_config.name, builder.info.features["label"].names, train, test)


def _builder(data_config):
    import tensorflow_datasets as tfds  # Imported here: it is slow and only needed here.

    try:
        return tfds.builder(data_config.name, data_dir=data_config.data_dir)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends.
        raise Error(f"cannot open tfds data set {data_config.name!r}: {first_line(e)}") from None


def _missing_message(builder, why: str) -> str:
    return (
        f"data set {builder.name} {builder.version} is not prepared in {builder.data_dir} and {why}. "
        f"Fix: point --config.data.data_dir at a folder holding a prepared copy "
        f"({builder.name}/{builder.version}/), or set --config.data.archive to a copy of "
        f"{tfds_format.ARCHIVES[builder.name][0]}, or prepare it on a machine with network "
        f"(the same command) and copy that folder here"
    )


def download_host_reachable(url: str, timeout: float = 5.0) -> Optional[str]:
    """None if the host of `url` accepts a TCP connection, else why not."""
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port} unreachable: {first_line(e)}"


def _data_dir(builder) -> str:
    """The data_dir that holds the builder's NAME/VERSION folder."""
    return os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))


def _prepare(builder, data_config) -> None:
    """Writes the data set from its official archive (data.archive, else downloaded), aside and
    then moved into place, so an interrupted preparation leaves no half data set."""
    if builder.name not in tfds_format.ARCHIVES:
        raise Error(
            f"data set {builder.name} {builder.version} is not prepared in {builder.data_dir}, and only CIFAR-10 "
            f"and CIFAR-100 are prepared here. Fix: prepare it with tfds (tfds build {builder.name} "
            f"--data_dir {_data_dir(builder)} --file_format array_record), or point --config.data.data_dir at "
            f"a folder holding a prepared copy"
        )
    archive = data_config.archive or _download(builder, data_config)
    try:
        splits, label_names = tfds_format.read_official_archive(archive, builder.name)
    except ValueError as e:
        raise Error(_missing_message(builder, f"cannot be prepared: {first_line(e)}")) from None
    root = _data_dir(builder)
    os.makedirs(os.path.join(root, builder.name), exist_ok=True)
    aside = tempfile.mkdtemp(prefix=f".{builder.name}-incomplete-", dir=root)
    try:
        folder = tfds_format.write(aside, builder.name, splits, label_names)
        try:
            os.replace(folder, os.fspath(builder.data_dir))
        except OSError:  # Another process of the run prepared it first.
            if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _download(builder, data_config) -> str:
    """The official archive, downloaded and checked against the checksums tfds ships."""
    import tensorflow_datasets as tfds

    url = tfds_format.ARCHIVES[builder.name][0]
    # tfds retries for minutes when offline; a short connection probe finds out at once.
    unreachable = download_host_reachable(url)
    if unreachable:
        raise Error(_missing_message(builder, f"cannot be downloaded ({unreachable})"))
    manager = tfds.download.DownloadManager(download_dir=os.path.join(_data_dir(builder), "downloads"))
    try:
        return os.fspath(manager.download(url))
    except Exception as e:
        raise Error(_missing_message(builder, f"downloading {url} failed: {first_line(e)}")) from None


def _read_split(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """A whole split as (uint8 images, int32 labels), its length checked."""
    import tensorflow_datasets as tfds

    try:
        expected = builder.info.splits[split].num_examples
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            # Random access through tfds.data_source: no TensorFlow needed.
            source = builder.as_data_source(split=split)
            images, labels = [], []
            for start in range(0, len(source), _READ_CHUNK):
                records = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
                images.extend(r["image"] for r in records)
                labels.extend(r["label"] for r in records)
            images, labels = np.stack(images), np.asarray(labels)
        else:  # The older tfrecord format (an existing ~/tensorflow_datasets, gs://): needs TF.
            if importlib.util.find_spec("tensorflow") is None:
                raise Error(
                    f"{builder.data_path} holds {builder.name} in the tfrecord format, which only TensorFlow reads: "
                    f"pip install tensorflow-cpu, or point --config.data.data_dir at an empty folder to prepare "
                    f"an array_record copy there"
                )
            data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            images, labels = data["image"], data["label"]
    except Error:
        raise
    except Exception as e:
        raise Error(
            f"cannot read the {split} split of {builder.name} in {builder.data_path}: {first_line(e)}. "
            f"The files are unreadable, truncated or corrupt: fix the permissions or prepare the data set again"
        ) from None
    if len(images) != expected:
        raise Error(
            f"the {split} split in {builder.data_path} holds {len(images)} examples, its metadata says {expected}: "
            f"the files are truncated or corrupt; prepare the data set again"
        )
    return images.astype(np.uint8), labels.astype(np.int32)
