"""The data layer on real-format tfds data: reading, batching, sharding, augmentation, errors."""

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_reliability import one_line_error

from configs import default
from conftest import CIFAR10_ARCHIVE, ROOT
from resnet_jax import parallel, tfds_writer
from resnet_jax.data import pipeline, registry, tfds_source
from resnet_jax.data.dataset import channel_stats, validation_indices
from resnet_jax.errors import Error


def data_config(data_dir, **overrides):
    config = default.get_config().data
    config.data_dir = data_dir
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def dataset(small_data_dir):
    return registry.load_dataset(data_config(small_data_dir))


def test_loads_both_splits_as_uint8_with_names_and_stats(dataset):
    assert dataset.train_images.shape == (2000, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (500, 32, 32, 3) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int32 and dataset.train_labels.shape == (2000,)
    assert dataset.class_names[:3] == ("airplane", "automobile", "bird") and dataset.num_classes == 10
    assert np.bincount(dataset.train_labels).tolist() == [200] * 10  # the balanced subset
    if os.path.exists(CIFAR10_ARCHIVE):  # CIFAR-10's well-known per-channel statistics, give or take the subset.
        np.testing.assert_allclose(dataset.mean, [125.3, 123.0, 113.9], atol=4)
        np.testing.assert_allclose(dataset.std, [63.0, 62.1, 66.7], atol=4)
    else:  # The synthetic stand-ins: the train split's own statistics, not the test split's.
        np.testing.assert_allclose(dataset.mean, dataset.train_images.reshape(-1, 3).mean(0), rtol=1e-5)
        assert not np.allclose(dataset.mean, dataset.test_images.reshape(-1, 3).mean(0), rtol=1e-5)


def test_validation_split_is_fixed_balanced_and_disjoint_from_training(dataset, small_data_dir):
    held = registry.load_dataset(data_config(small_data_dir, validation_examples=205))
    again = registry.load_dataset(data_config(small_data_dir, validation_examples=205))
    np.testing.assert_array_equal(held.validation_images, again.validation_images)
    # Class-balanced: 205 = 10 x 20 + 5, the first five classes one more.
    assert np.bincount(held.validation_labels, minlength=10).tolist() == [21] * 5 + [20] * 5
    # Moved out of train: together they are the train split, with nothing shared.
    assert len(held.train_images) == 2000 - 205
    key = lambda images: {img.tobytes() for img in images}  # noqa: E731
    assert not key(held.validation_images) & key(held.train_images)
    assert key(held.validation_images) | key(held.train_images) == key(dataset.train_images)
    assert [name for name, *_ in held.eval_splits()] == ["validation", "test"]
    assert [name for name, *_ in dataset.eval_splits()] == ["test"]
    # Normalisation statistics come from what is trained on.
    np.testing.assert_allclose(held.mean, channel_stats(held.train_images)[0])
    # Not drawn from config.seed or anything of the device layout: a function of the labels and N only.
    labels = dataset.train_labels
    np.testing.assert_array_equal(validation_indices(labels, 205, 10), validation_indices(labels.copy(), 205, 10))
    with pytest.raises(Error, match="asks for 201 examples of class 0, but the train split has 200"):
        validation_indices(labels, 2010, 10)


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0), rtol=1e-5)


def test_train_batches_are_a_pure_function_of_seed_and_step():
    kw = dict(num_examples=1000, batch_size=64, seed=3)
    first = pipeline.train_indices(5, **kw)
    pipeline._permutation.cache_clear()
    np.testing.assert_array_equal(pipeline.train_indices(5, **kw), first)  # as after a restore
    assert not np.array_equal(pipeline.train_indices(6, **kw), first)
    assert not np.array_equal(pipeline.train_indices(5, **{**kw, "seed": 4}), first)
    # An epoch (15 steps of 64 from 1000) visits distinct examples and drops the remainder.
    epoch = np.concatenate([pipeline.train_indices(s, **kw) for s in range(15)])
    assert len(np.unique(epoch)) == 15 * 64
    # The next epoch is a different order.
    assert not np.array_equal(pipeline.train_indices(15, **kw), pipeline.train_indices(0, **kw))


def test_resumed_stream_equals_the_uninterrupted_one():
    images = np.arange(300 * 2 * 2 * 1, dtype=np.uint8).reshape(300, 2, 2, 1)
    labels = np.arange(300, dtype=np.int32)
    kw = dict(batch_size=32, seed=0)
    uninterrupted = [parallel.shard(pipeline.train_batch(images, labels, s, **kw), 8) for s in range(20)]
    pipeline._permutation.cache_clear()  # a fresh process restored at step 13
    for step in range(13, 20):
        resumed = parallel.shard(pipeline.train_batch(images, labels, step, **kw), 8)
        for key in resumed:
            np.testing.assert_array_equal(resumed[key], uninterrupted[step][key])


def test_process_slices_are_disjoint_and_complete():
    labels = np.arange(1000, dtype=np.int32)
    images = np.zeros((1000, 1, 1, 1), np.uint8)
    for processes in (1, 2, 4):
        parts = [
            parallel.shard(
                pipeline.train_batch(
                    images, labels, 7, batch_size=64, seed=1, part=parallel.process_slice(64, p, processes)
                ),
                8 // processes,
            )
            for p in range(processes)
        ]
        for part in parts:
            assert part["label"].shape == (8 // processes, 8)
        got = np.concatenate([p["label"].reshape(-1) for p in parts])
        np.testing.assert_array_equal(got, pipeline.train_indices(7, num_examples=1000, batch_size=64, seed=1))
        np.testing.assert_array_equal(np.concatenate([p["position"].reshape(-1) for p in parts]), np.arange(64))


@pytest.mark.parametrize("processes,devices", [(1, 8), (2, 4), (1, 1)])
def test_eval_sees_every_example_exactly_once(processes, devices):
    n = 1003
    labels = np.arange(n, dtype=np.int32)
    images = np.zeros((n, 1, 1, 1), np.uint8)
    seen = []
    for p in range(processes):
        for batch in pipeline.eval_batches(
            images, labels, batch_size=80, part=parallel.process_slice(80, p, processes)
        ):
            batch = parallel.shard(batch, devices)
            assert batch["image"].shape[:2] == (devices, 80 // processes // devices)
            seen.extend(batch["label"][batch["mask"] == 1].tolist())
    assert sorted(seen) == list(range(n))


def known_images(n=6, size=8):
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors_it(mode):
    images = known_images()
    out, keep = pipeline.augment(jax.random.key(0), images, jnp.arange(6), crop_padding=2, padding_mode=mode)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(keep, 1.0)
    padded = np.pad(
        np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode={"zero": "constant", "reflect": "reflect"}[mode]
    )
    windows = set()
    for i in range(6):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if np.array_equal(
                np.asarray(out[i]),
                padded[i, dy : dy + 8, dx : dx + 8][:, ::-1] if flip else padded[i, dy : dy + 8, dx : dx + 8],
            )
        ]
        assert matches, f"example {i} is not a (mirrored) window of its padded image"
        windows.add(matches[0])
    assert len(windows) > 1  # examples get different crops


def test_augmentation_depends_on_position_not_on_device_layout():
    images = known_images(8)
    positions = jnp.arange(8)
    key = jax.random.key(42)
    whole, _ = pipeline.augment(key, images, positions)
    halves = [pipeline.augment(key, images[s], positions[s])[0] for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    # Identical images at different positions are augmented differently.
    same = jnp.broadcast_to(images[:1], images.shape)
    out, _ = pipeline.augment(key, same, positions)
    assert len({np.asarray(o).tobytes() for o in out}) > 1


def test_a_mixed_pair_is_the_same_whichever_rows_a_device_or_process_holds():
    images = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(100, dtype=np.int32)
    kw = dict(batch_size=16, seed=0, mix=True)
    whole = pipeline.train_batch(images, labels, 3, **kw)
    # The partner is the mirrored position of the global batch (timm's batch.flip(0)).
    np.testing.assert_array_equal(whole["partner_position"], 15 - np.arange(16))
    np.testing.assert_array_equal(whole["partner_label"], whole["label"][::-1])
    key = jax.random.key(7)
    augmented = np.asarray(pipeline.augment(key, whole["image"], whole["position"])[0])
    for processes, devices in ((1, 8), (2, 4), (4, 1)):
        for p in range(processes):
            part = parallel.process_slice(16, p, processes)
            rows = parallel.shard(pipeline.train_batch(images, labels, 3, part=part, **kw), devices)
            for d in range(devices):
                # Each row's partner, augmented on the device that holds the row by its own
                # position, is exactly what the partner's own row becomes wherever it is.
                partners = pipeline.augment(key, rows["partner_image"][d], rows["partner_position"][d])[0]
                np.testing.assert_array_equal(partners, augmented[rows["partner_position"][d]])
    assert "partner_image" not in pipeline.train_batch(images, labels, 3, batch_size=16, seed=0)  # not sent unmixed


def test_the_mix_draw_is_a_pure_function_of_seed_and_step():
    def draw(seed, step, mixup_alpha=0.4, cutmix_alpha=1.0):
        lam, weight = pipeline.mix_weights(
            jax.random.key(seed), step, 16, 12, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
        )
        return float(lam), np.asarray(weight)

    first = draw(0, 5)
    assert first[0] == draw(0, 5)[0] and np.array_equal(first[1], draw(0, 5)[1])  # as after a restore
    assert draw(0, 6)[0] != first[0] and draw(1, 5)[0] != first[0]
    kinds = []
    for step in range(40):
        lam, weight = draw(0, step)
        assert weight.shape == (16, 12, 1) and 0 < lam <= 1
        values = set(np.unique(weight))
        if values <= {0.0, 1.0}:  # CutMix: lam is the area outside the pasted box
            kinds.append("cutmix")
            assert lam == pytest.approx(1 - (weight == 0).sum() / (16 * 12), rel=1e-6)
            rows, cols = np.nonzero(weight[..., 0] == 0)
            assert (weight[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == 0).all()  # one box
        else:  # Mixup: one weight everywhere
            kinds.append("mixup")
            assert values == {np.float32(lam)}
    assert 10 < kinds.count("cutmix") < 30  # one of the two per batch, evenly
    assert all(set(np.unique(draw(0, s, mixup_alpha=0)[1])) == {0.0, 1.0} for s in range(5))  # CutMix alone
    assert all(len(np.unique(draw(0, s, cutmix_alpha=0)[1])) == 1 for s in range(5))  # Mixup alone


@pytest.mark.parametrize("side", [6, 5])
def test_cutout_erases_a_square_after_normalisation(side):
    size, n = 16, 64
    images = jnp.full((n, size, size, 3), 200, jnp.uint8)
    config = ml_collections.ConfigDict(dict(crop_padding=0, padding_mode="zero", cutout=side))
    out = pipeline.preprocess(
        images, [100.0] * 3, [50.0] * 3, jnp.float32, key=jax.random.key(0), positions=jnp.arange(n), data_config=config
    )
    clipped = 0
    for x in np.asarray(out):
        assert set(np.unique(x)) <= {0.0, 2.0}  # erased after normalising: 0, not (0 - 100) / 50
        erased = (x == 0).all(-1)
        assert erased.any()
        assert (erased == (x == 0).any(-1)).all()  # every channel of a pixel, or none
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        # Exactly one axis-aligned box: its bounding box is erased whole, and nothing else is.
        box = np.zeros_like(erased)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(erased, box)
        # Of side `side`, but where its centre lies near a border: clipped there, never below
        # the half that lies on the centre's side.
        for start, extent in ((rows.min(), len(rows)), (cols.min(), len(cols))):
            if extent != side:
                clipped += 1
                assert side - side // 2 <= extent < side
                assert start == 0 or start + extent == size
    assert 0 < clipped < n  # both kinds of box were seen


def test_preprocess_normalises_and_follows_the_dtype():
    images = jnp.full((2, 4, 4, 3), 255, jnp.uint8)
    out = pipeline.preprocess(images, [127.5] * 3, [127.5] * 3, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 1.0)


def test_missing_data_offline_fails_fast_with_one_line(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(Error) as e:
        registry.load_dataset(data_config(str(tmp_path)))
    message = str(e.value)
    assert "\n" not in message
    assert "cifar10 3.0.2 is not prepared in " + str(tmp_path) in message
    assert "www.cs.toronto.edu:443 unreachable: Network is unreachable" in message
    assert "--config.data.data_dir" in message and "copy that folder" in message
    assert not (tmp_path / "downloads").exists()


def test_only_cifar_is_prepared_here_another_tfds_data_set_is_named_in_one_line(tmp_path):
    with pytest.raises(Error) as e:
        tfds_source.load(data_config(str(tmp_path), name="mnist"))
    message = str(e.value)
    assert "\n" not in message and "mnist" in message and "only CIFAR-10 and CIFAR-100 are prepared here" in message


def test_a_tfds_data_set_s_image_shape_is_its_registry_entry_s():
    assert registry.DATASETS["cifar10"].image_shape(None) == (32, 32, 3)
    assert registry.DATASETS["cifar100"].image_shape(None) == (32, 32, 3)


def test_truncated_record_files_give_a_clear_error(small_data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(small_data_dir, copy)
    shard = copy / "cifar10" / "3.0.2" / "cifar10-train.array_record-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(Error, match="train split of cifar10 .*(truncated or corrupt)"):
        registry.load_dataset(data_config(str(copy)))


def test_unreadable_data_dir_gives_a_clear_error(small_data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(small_data_dir, copy)
    shard = copy / "cifar10" / "3.0.2" / "cifar10-test.array_record-00000-of-00001"
    shard.unlink()
    with pytest.raises(Error, match="test split of cifar10"):
        registry.load_dataset(data_config(str(copy)))


@pytest.mark.slow
def test_training_on_array_record_data_never_imports_tensorflow(small_data_dir):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import jax
        from configs import smoke
        from resnet_jax import parallel, train
        from resnet_jax.data import pipeline, registry, tfds_source
        config = smoke.get_config()
        config.data.data_dir = {small_data_dir!r}
        dataset = registry.load_dataset(config.data)
        setup = train.Setup(config, dataset)
        state = setup.layout.replicate(setup.fresh_state)
        batch = setup.layout.place_batch(pipeline.train_batch(dataset.train_images, dataset.train_labels, 0,
            batch_size=config.batch_size, seed=0))
        state = setup.parallel_train_step()(state, batch)
        jax.block_until_ready(state)
        print("tensorflow" in sys.modules, jax.local_device_count())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "8"]


# ------------------------------------------------------------------------ the older tfrecord format


def _crc32c_table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15 bits plus a constant."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def as_tfrecord(folder) -> None:
    """Rewrites the tfds data set in `folder` (NAME/VERSION) from array_record to tfrecord, as
    `download_and_prepare` writes it by default: the same tf.Examples, each framed as length,
    its checksum, data, its checksum; `fileFormat` tfrecord in dataset_info.json."""
    from array_record.python import array_record_module

    for name in os.listdir(folder):
        if ".array_record-" not in name:
            continue
        reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
        records = reader.read_all()
        reader.close()
        os.remove(os.path.join(folder, name))
        with open(os.path.join(folder, name.replace(".array_record-", ".tfrecord-")), "wb") as f:
            for record in records:
                length = struct.pack("<Q", len(record))
                f.write(length + struct.pack("<I", masked_crc32c(length)) + record)
                f.write(struct.pack("<I", masked_crc32c(record)))
    info_path = os.path.join(folder, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)


def test_the_checksum_is_crc32c():
    crc = (masked_crc32c(b"123456789") - 0xA282EAD8) & 0xFFFFFFFF
    assert ((crc << 15) | (crc >> 17)) & 0xFFFFFFFF == 0xE3069283  # CRC-32C's check value


@pytest.fixture(scope="module")
def tfrecord_data(tmp_path_factory):
    """(data_dir, splits): a 20 + 10 image cifar10 in the tfrecord format, and its images and labels."""
    data_dir = str(tmp_path_factory.mktemp("tfrecord"))
    splits = tfds_writer.synthetic(10, {"train": 20, "test": 10}, seed=3)
    as_tfrecord(tfds_writer.write(data_dir, "cifar10", splits, {"label": tfds_writer.CIFAR10_LABELS}))
    return data_dir, splits


def test_a_tfrecord_data_set_is_read_through_tensorflow(tfrecord_data):
    pytest.importorskip("tensorflow", reason="the tfrecord format is read through TensorFlow")
    data_dir, splits = tfrecord_data
    dataset = registry.load_dataset(data_config(data_dir))
    assert dataset.class_names == tfds_writer.CIFAR10_LABELS
    np.testing.assert_array_equal(dataset.train_images, splits["train"]["image"])
    np.testing.assert_array_equal(dataset.train_labels, splits["train"]["label"])
    np.testing.assert_array_equal(dataset.test_images, splits["test"]["image"])
    np.testing.assert_array_equal(dataset.test_labels, splits["test"]["label"])


# run.py where TensorFlow cannot be found, as where it is not installed: find_spec says None and
# `import tensorflow` raises ModuleNotFoundError. (sys.modules["tensorflow"] = None would not do:
# tfds takes any entry there for TensorFlow loaded.)
RUN_WITHOUT_TENSORFLOW = """
import importlib.machinery, runpy, sys

class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [
    PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
sys.argv[0] = "run.py"
runpy.run_path("run.py", run_name="__main__")
"""


def test_a_tfrecord_data_set_without_tensorflow_fails_in_one_line_naming_the_fix(tfrecord_data, tmp_path):
    data_dir, _ = tfrecord_data
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TENSORFLOW, "--config", "configs/smoke.py"]
        + [f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}", "--config.num_train_steps=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    folder = os.path.join(data_dir, "cifar10", "3.0.2")
    assert one_line_error(result, 2) == (
        f"error: {folder} holds cifar10 in the tfrecord format, which only TensorFlow reads: pip install "
        "tensorflow-cpu, or point --config.data.data_dir at an empty folder to prepare an array_record copy there"
    )
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
