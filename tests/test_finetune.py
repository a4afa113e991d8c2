"""init_from: fine-tuning from another run's checkpoint or torchvision-style PyTorch weights."""

import functools
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import sys
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from test_image_folder import make_folder
from test_predict import averaged_run_workdir
from test_reliability import one_line_error

from configs import smoke
from conftest import CIFAR10_ARCHIVE, run_cli
from resnet_jax import checkpoints, convert, finetune, models, train, workdir as workdir_lib
from resnet_jax.data.dataset import Dataset
from resnet_jax.errors import Error

# The same short recipe for the fine-tuned and the from-scratch run on the image folder.
RECIPE = (
    "--config.num_train_steps=20",
    "--config.learning_rate=0.02",
    "--config.schedule=constant",
    "--config.warmup_epochs=0",
    "--config.eval_every_epochs=100",
    "--config.log_every_steps=10",
)


def fake_dataset(num_classes: int, size: int = 32) -> Dataset:
    """Shapes and class names only: enough for train.Setup."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    labels = np.arange(64, dtype=np.int32) % num_classes
    return Dataset(
        "fake",
        tuple(f"c{i}" for i in range(num_classes)),
        images,
        labels,
        images,
        labels,
        np.full(3, 127.0, np.float32),
        np.full(3, 64.0, np.float32),
    )


@functools.lru_cache(maxsize=None)
def smoke_setup(num_classes: int) -> train.Setup:
    """The smoke config's Setup (each costs an init compile of seconds: shared)."""
    config = smoke.get_config()
    return train.Setup(config, fake_dataset(num_classes))


def random_variables(setup: train.Setup, seed: int) -> dict:
    """Random variables shaped as the setup model's (none equal to its initial ones)."""
    rng = np.random.default_rng(seed)
    state = setup.fresh_state
    return jax.tree.map(
        lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
        {"params": state.params, "batch_stats": state.batch_stats},
    )


def torchvision_state_dict(variables: dict, stage_sizes, block: str = "basic") -> dict:
    """`variables` under torchvision's ResNet names and layouts: the inverse of convert.torch_to_flax."""
    params = variables["params"]

    def has_projection(prefix):  # "layer2.0" -> stage2_block1
        return "proj_conv" in params.get(f"stage{int(prefix[5])}_block{int(prefix.split('.')[1]) + 1}", {})

    state_dict = {}
    for key, collection, path, _ in convert.key_map(stage_sizes, block, has_projection):
        value = np.asarray(traverse_util.flatten_dict(variables[collection])[path])
        if key == "fc.weight":
            value = value.T
        elif path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state_dict[key] = np.ascontiguousarray(value)
        if key.endswith("running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return state_dict


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def assert_trees_equal(a, b, skip=()):
    a, b = flat(a), flat(b)
    assert set(a) == set(b)
    for key in a:
        if key[: len(skip)] != tuple(skip) or not skip:
            np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


def fine_tune_state(setup, init_from, init_from_step="latest"):
    config = setup.config.copy_and_resolve_references()
    config.init_from, config.init_from_step = str(init_from), init_from_step
    return finetune.imported_state(config, setup)


@pytest.mark.parametrize("num_classes", [10, 2])
def test_torchvision_weights_load_from_safetensors(tmp_path, num_classes):
    source = random_variables(smoke_setup(10), seed=1)
    path = tmp_path / "weights.safetensors"
    save_file(torchvision_state_dict(source, (1, 1, 1)), str(path))
    setup = smoke_setup(num_classes)
    state = fine_tune_state(setup, path)
    assert_trees_equal(state.batch_stats, source["batch_stats"])
    if num_classes == 10:  # Same classes: everything is loaded, the head too.
        assert_trees_equal(state.params, source["params"])
    else:  # A new head, initialised as a fresh run's; the rest loaded.
        assert_trees_equal(state.params, source["params"], skip=("head",))
        assert_trees_equal(state.params["head"], setup.fresh_state.params["head"])
    assert int(state.step) == 0
    for new, fresh in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(setup.fresh_state.opt_state)):
        np.testing.assert_array_equal(new, fresh)  # the optimizer starts fresh


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# Written once by torch (tests/fixtures/make_torch_pt.py): a tiny state_dict, and one whose pickle
# also holds a call of os.makedirs(EVIL_MARKER), a directory made wherever it is unpickled.
WEIGHTS_PT, EVIL_PT = os.path.join(FIXTURES, "weights.pt"), os.path.join(FIXTURES, "evil.pt")
EVIL_MARKER = "unpickled_by_torch_load"


def unpickle_as_a_plain_loader_would(path):
    """The pickle inside a torch .pt file, loaded by the standard unpickler (tensors as None):
    what a loader without weights_only=True does, torch or not."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return (lambda *args: None) if module.startswith("torch") else super().find_class(module, name)

        def persistent_load(self, pid):
            return None

    with zipfile.ZipFile(path) as archive:
        [data] = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        return Unpickler(io.BytesIO(archive.read(data))).load()


def test_torch_load_reads_weights_only(tmp_path, monkeypatch):
    """Runs with and without torch: a .pt is never unpickled without weights_only=True."""
    monkeypatch.chdir(tmp_path)  # where EVIL_MARKER would appear
    marker = tmp_path / EVIL_MARKER
    # The evil fixture is evil: unpickled plainly, its payload runs.
    assert set(unpickle_as_a_plain_loader_would(EVIL_PT)) == {"conv1.weight", "extra"} and marker.is_dir()
    marker.rmdir()

    # Without torch: one line that says torch is needed and how to do without, and nothing unpickled.
    with monkeypatch.context() as no_torch:
        no_torch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as where it is absent
        for path in (WEIGHTS_PT, EVIL_PT):
            with pytest.raises(Error) as raised:
                finetune.read_state_dict(path)
            assert str(raised.value) == (
                f"reading the PyTorch file {path} needs torch (pip install torch); or save the state_dict with "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') and use that file"
            )
    assert not marker.exists()
    if importlib.util.find_spec("torch") is None:
        return  # CI: the rest needs torch itself

    import torch

    # With torch: the tensors as NumPy (floating ones as float32), and the payload refused unrun.
    weights = finetune.read_state_dict(WEIGHTS_PT)
    assert set(weights) == {"conv1.weight", "bn1.num_batches_tracked"}
    assert weights["conv1.weight"].dtype == np.float32 and weights["bn1.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(weights["conv1.weight"], np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1) / 2)
    assert weights["bn1.num_batches_tracked"] == 7
    with pytest.raises(
        Error, match=r"cannot read .*evil\.pt as a state_dict of tensors with torch\.load\(weights_only=True\)"
    ):
        finetune.read_state_dict(EVIL_PT)
    assert not marker.exists()

    # And a whole ResNet's state_dict, saved by torch now, fine-tunes as its safetensors twin does.
    source = random_variables(smoke_setup(10), seed=2)
    state_dict = torchvision_state_dict(source, (1, 1, 1))
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "weights.pt")
    state = fine_tune_state(smoke_setup(10), tmp_path / "weights.pt")
    assert_trees_equal(state.params, source["params"])


class StandInTensor:
    """What `finetune.read_state_dict` uses of a torch.Tensor, backed by a NumPy array."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def is_floating_point(self):
        return np.issubdtype(self.array.dtype, np.floating)

    def float(self):
        return StandInTensor(self.array.astype(np.float32))

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def stand_in_torch(state_dict: dict, calls: list):
    """A module named torch whose `load` records its arguments in `calls` and returns
    `state_dict` as StandInTensors: how the loader calls torch, observable without torch."""
    module = type(sys)("torch")
    module.Tensor = StandInTensor

    def load(path, *args, **kwargs):
        calls.append({"path": str(path), "args": args, **kwargs})
        return {k: StandInTensor(v) for k, v in state_dict.items()}

    module.load = load
    return module


def test_a_pt_file_is_loaded_with_weights_only_where_torch_is_absent_too(tmp_path, monkeypatch):
    """The .pt path's call of torch.load, held with or without torch installed: weights_only=True,
    given explicitly (older torch releases default to unpickling anything)."""
    source = random_variables(smoke_setup(10), seed=4)
    state_dict = torchvision_state_dict(source, (1, 1, 1))
    path = tmp_path / "weights.pt"
    path.write_bytes(b"read by the stand-in torch.load only")
    calls = []
    monkeypatch.setitem(sys.modules, "torch", stand_in_torch(state_dict, calls))
    state = fine_tune_state(smoke_setup(10), path)  # as --config.init_from=weights.pt reads it
    assert len(calls) == 1 and calls[0]["path"] == str(path) and calls[0]["args"] == (), calls
    assert calls[0].get("weights_only") is True, f"torch.load called without weights_only=True: {calls[0]}"
    assert_trees_equal(state.params, source["params"])
    assert_trees_equal(state.batch_stats, source["batch_stats"])


def test_a_different_architecture_names_the_first_parameter_that_does_not_fit(tmp_path):
    state_dict = torchvision_state_dict(random_variables(smoke_setup(10), seed=3), (1, 1, 1))
    wide = dict(state_dict, **{"conv1.weight": np.ones((16, 3, 3, 3), np.float32)})  # a stem of 16 filters
    wide.update(
        {f"bn1.{field}": np.ones(16, np.float32) for field in ("weight", "bias", "running_mean", "running_var")}
    )
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(Error) as raised:
        fine_tune_state(smoke_setup(10), tmp_path / "wide.safetensors")
    assert str(raised.value) == (
        f"--config.init_from={tmp_path / 'wide.safetensors'} does not fit resnet8, num_filters=8: "
        "params/bn_init/bias has shape (16,) there, (8,) here; "
        "fine-tuning needs the same architecture (only the number of classes may differ)"
    )
    del state_dict["layer2.0.conv1.weight"]
    save_file(state_dict, str(tmp_path / "partial.safetensors"))
    with pytest.raises(Error, match=r"does not fit resnet8, num_filters=8: layer2\.0\.conv1\.weight is missing there"):
        fine_tune_state(smoke_setup(10), tmp_path / "partial.safetensors")


@pytest.mark.parametrize("num_classes", [10, 2])
def test_a_bias_free_head_is_new_when_the_number_of_classes_differs(num_classes):
    def variables(classes, seed):  # random ones, shaped as a narrow ResNet-9's: its head is a kernel alone
        model = models.get_model("resnet9", num_classes=classes, num_filters=4)
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), np.zeros((1, 32, 32, 3)))
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)

    loaded, template = variables(10, seed=1), variables(num_classes, seed=2)
    merged, new_head = finetune.merge(smoke.get_config(), "a run", template, loaded)
    assert new_head == (num_classes != 10)
    assert_trees_equal(merged["batch_stats"], loaded["batch_stats"])
    assert_trees_equal(merged["params"], loaded["params"], skip=("head",))
    assert_trees_equal(merged["params"]["head"], (template if new_head else loaded)["params"]["head"])


def test_a_state_dict_fits_the_resnets_only(tmp_path):
    config = smoke.get_config()
    config.model.name = "resnet9"
    config.init_from = str(tmp_path / "weights.safetensors")
    save_file({"conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}, config.init_from)
    with pytest.raises(
        Error, match=r"a torchvision-style state_dict fits the ResNets, not resnet9; give a resnet9 run's workdir"
    ):
        finetune.read_source(config, models.get_model("resnet9", num_classes=10))


# These runs test fine-tuning, not the pmapped paths (other tests run those on 8 devices):
# one device spares them the per-device overhead on a 2-core CPU.
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run_smoke(workdir, *args):
    result = run_cli("--config", "configs/smoke.py", "--workdir", str(workdir), *args, env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def pretrained(small_data_dir, tmp_path_factory):
    """A resnet8 trained on 2,000 CIFAR-10 images (the smoke recipe: 248 steps, 38% test accuracy)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    run_smoke(workdir, f"--config.data.data_dir={small_data_dir}", "--config.eval_every_epochs=100")
    return str(workdir)


@pytest.fixture(scope="module")
def averaged_source(tiny_data_dir, tmp_path_factory):
    """A 9-step smoke run that keeps a weight average (ema_decay 0.9) and holds out a validation split:
    evaluated and checkpointed every 3 steps, so each of its checkpoints 3, 6 and 9 may be the best."""
    return averaged_run_workdir(tiny_data_dir, tmp_path_factory)


def raw_checkpoint(workdir, step: int) -> dict:
    """The checkpoint of `step` in `workdir` as orbax wrote it: params, batch_stats, ema, opt_state, ..."""
    manager = checkpoints.create_manager(workdir, keep=1, read_only=True)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()


def imported(workdir, init_from_step, caplog):
    """(the step the fine-tune reported importing, its state) for `init_from_step` of `workdir`."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        state = fine_tune_state(smoke_setup(10), workdir, init_from_step)
    [step] = [int(m) for m in re.findall(rf"fine-tuning from the checkpoint at step (\d+) of {workdir}:", caplog.text)]
    return step, state


@pytest.mark.slow
def test_a_runs_weight_average_is_what_fine_tuning_imports(averaged_source, caplog):
    step, state = imported(averaged_source, "latest", caplog)
    checkpoint = raw_checkpoint(averaged_source, 9)
    assert step == 9
    assert_trees_equal(state.params, checkpoint["ema"]["params"])
    assert_trees_equal(state.batch_stats, checkpoint["ema"]["batch_stats"])
    raw = flat(checkpoint["params"])
    assert any(not np.array_equal(value, raw[key]) for key, value in flat(state.params).items())


@pytest.mark.slow
def test_init_from_step_imports_a_numbered_or_the_best_checkpoint(averaged_source, caplog):
    validation = {
        r["step"]: r["accuracy"]
        for r in workdir_lib.read_metrics(os.path.join(averaged_source, "metrics.jsonl"))
        if r["split"] == "validation"
    }
    assert sorted(validation) == [3, 6, 9]  # every checkpoint was saved with its validation accuracy
    for which in ("3", "6", "best"):
        step, state = imported(averaged_source, which, caplog)
        if which == "best":  # the highest validation accuracy (the run's test accuracy never chooses)
            assert validation[step] == max(validation.values()), (step, validation)
        else:
            assert step == int(which)
        assert_trees_equal(state.params, raw_checkpoint(averaged_source, step)["ema"]["params"])
    three, six = (flat(imported(averaged_source, n, caplog)[1].params) for n in ("3", "6"))
    assert any(not np.array_equal(value, six[key]) for key, value in three.items())


@pytest.mark.slow
def test_init_from_step_refuses_a_missing_step_and_best_without_a_validation_split(
    pretrained, small_data_dir, tmp_path
):
    checkpoints_dir = os.path.join(pretrained, "checkpoints")
    refusals = {
        "7": f"no checkpoint at step 7 in {checkpoints_dir}; available: 100, 200, 248",
        "best": (
            f"no 'best' checkpoint in {checkpoints_dir}: that run had no validation split, and the test split never "
            "selects a checkpoint (its accuracy would then be optimistic). Use 'latest' or a step number, or train "
            "with --config.data.validation_examples=5000"
        ),
    }
    for which, message in refusals.items():
        result = run_cli(
            *("--config", "configs/smoke.py", "--workdir", str(tmp_path / which)),
            f"--config.data.data_dir={small_data_dir}",
            f"--config.init_from={pretrained}",
            f"--config.init_from_step={which}",
            env=ONE_DEVICE,
        )
        assert one_line_error(result, 2) == f"error: {message}"
        assert result.stderr.strip().splitlines()[-1] == f"error: {message}"


@pytest.fixture(scope="module")
def planes_and_cars(tmp_path_factory):
    """A 2-class image folder of real CIFAR-10 test images: 300 train and 100 test per class."""
    return make_folder(tmp_path_factory.mktemp("folder"), ["airplane", "automobile"], train=300, test=100)


def last_test_accuracy(workdir) -> float:
    return [r for r in workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "test"][-1][
        "accuracy"
    ]


@pytest.fixture(scope="module")
def fine_tuned(pretrained, planes_and_cars, tmp_path_factory):
    """The workdir of the fine-tune run on the folder, and both runs' test accuracies."""
    folder = ("--config.data.name=folder", f"--config.data.folder={planes_and_cars}", *RECIPE)
    scratch = str(tmp_path_factory.mktemp("scratch"))
    run_smoke(scratch, *folder)
    workdir = str(tmp_path_factory.mktemp("fine_tuned"))
    result = run_smoke(workdir, *folder, f"--config.init_from={pretrained}")
    assert (
        f"fine-tuning from the checkpoint at step 248 of {pretrained}: loaded 35 tensors; the head is new (2 classes)"
    ) in result.stderr
    return workdir, {"fine_tuned": last_test_accuracy(workdir), "scratch": last_test_accuracy(scratch)}


@pytest.mark.skipif(
    not os.path.exists(CIFAR10_ARCHIVE),
    reason="the gain is measured on real images, not the synthetic stand-ins (both runs learn those at once)",
)
@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch(fine_tuned):
    _, accuracies = fine_tuned
    # Measured with seeds 0, 1, 2 (this test runs seed 0): fine-tuned 0.815, 0.820, 0.810; from
    # scratch 0.745, 0.725, 0.745. The smallest gap, 0.065, is well above the 0.04 asked. From a
    # model pretrained half as long (124 steps) the gap fell to 0.04 at seed 2: hence 248 steps.
    assert accuracies["fine_tuned"] >= accuracies["scratch"] + 0.04, accuracies


@pytest.mark.slow
def test_folder_class_names_reach_predict_and_export(fine_tuned, planes_and_cars):
    workdir, _ = fine_tuned
    folder = ("--config.data.name=folder", f"--config.data.folder={planes_and_cars}")
    image = os.path.join(planes_and_cars, "test", "automobile", "0000.jpg")
    result = run_smoke(workdir, *folder, "--mode", "predict", "--json", image)
    assert {t["class"] for t in json.loads(result.stdout.strip().splitlines()[-1])["top3"]} == {
        "airplane",
        "automobile",
    }
    run_smoke(workdir, *folder, "--mode", "export", "--config.export_formats=stablehlo")
    with open(os.path.join(workdir, "export", "model.json")) as f:
        report = json.load(f)
    assert report["class_names"] == ["airplane", "automobile"] and list(report["exports"]) == ["stablehlo"]
    assert report["checkpoint"]["step"] == 20 and report["input"]["shape"] == [None, 32, 32, 3]


@pytest.mark.slow
def test_a_resumed_fine_tune_does_not_import_the_weights_again(fine_tuned, planes_and_cars, tmp_path):
    """Runs last in this file: it extends the fine-tune run. A resume that imported the
    weights again would fail on an init_from that no longer exists."""
    workdir, _ = fine_tuned
    gone = str(tmp_path / "moved_away")
    result = run_smoke(
        workdir,
        "--config.data.name=folder",
        f"--config.data.folder={planes_and_cars}",
        *RECIPE,
        "--config.num_train_steps=22",
        f"--config.init_from={gone}",
    )
    assert "resumed from the checkpoint at step 20" in result.stderr and "fine-tuning" not in result.stderr
    assert (
        last_test_accuracy(workdir) > 0
        and max(r["step"] for r in workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == 22
    )
    with pytest.raises(Error, match="does not exist; give a run's workdir or a state_dict file"):
        fine_tune_state(smoke_setup(10), gone)  # what a new run would say
