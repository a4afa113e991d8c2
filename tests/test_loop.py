"""The train loop in-process, on a tiny in-memory data set, in seconds: the periodic actions fall
due as their predicates say, a stop signal checkpoints and returns, and the resumed run ends
exactly where an uninterrupted one does."""

import os
import signal

import chex
import flax.serialization
import numpy as np
import pytest

from configs import smoke
from resnet_jax import checkpoints, loop, train
from resnet_jax.data.dataset import Dataset, hold_out_validation
from resnet_jax.workdir import read_metrics

TIMINGS = ("images_per_sec", "elapsed_seconds", "compile_seconds", "eval_seconds")
STEPS = 8  # two epochs of 128 images at batch 32: four steps per epoch


def tiny_dataset():
    """10 classes of 16x16 images: 128 to train on after 20 are held out for validation, 30 to test."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (178, 16, 16, 3), dtype=np.uint8)
    labels = (np.arange(178) % 10).astype(np.int32)
    dataset = Dataset(
        name="tiny", class_names=tuple("abcdefghij"), train_images=images[:148], train_labels=labels[:148],
        test_images=images[148:], test_labels=labels[148:], mean=np.full(3, 127.0, np.float32),
        std=np.full(3, 74.0, np.float32),
    )  # fmt: skip
    return hold_out_validation(dataset, 20)


def tiny_config():
    config = smoke.get_config()
    config.model.num_filters = 4
    config.batch_size, config.eval_batch_size, config.num_train_steps = 32, 16, STEPS
    config.log_every_steps, config.eval_every_epochs, config.checkpoint_every_steps = 3, 1.0, 3
    config.ema_decay, config.keep_checkpoints = 0.9, 10
    return config


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def final_state(workdir, config, dataset):
    manager = checkpoints.create_manager(str(workdir), 10, read_only=True)
    return flax.serialization.to_state_dict(
        checkpoints.restore_latest(manager, train.Setup(config, dataset).initial_state)
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert loop.train_and_evaluate(tiny_config(), str(workdir), tiny_dataset()) is True
    return workdir


def test_each_periodic_action_falls_due_as_its_predicate_says():
    due = loop.Due(num_steps=10, log_every=3, eval_every=4, checkpoint_every=5)
    steps = range(1, 11)
    assert [s for s in steps if due.log(s)] == [3, 6, 9, 10]
    assert [s for s in steps if due.evaluate(s)] == [4, 8, 10]
    assert [s for s in steps if due.checkpoint(s)] == [5, 10]
    assert [s for s in steps if due.stop_check(s)] == list(range(1, 10))  # one process: after every step but the last


def test_the_loop_logs_evaluates_and_checkpoints_on_schedule(uninterrupted):
    records = read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in records] == [
        (3, "train"), (4, "validation"), (4, "test"), (6, "train"),
        (8, "train"), (8, "validation"), (8, "test"),
    ]  # fmt: skip
    assert [("compile_seconds" in r) for r in records if r["split"] == "train"] == [True, False, False]
    # Every 3 steps, and after each evaluation (with the validation accuracy the best one is chosen on).
    assert sorted(int(s) for s in os.listdir(os.path.join(uninterrupted, "checkpoints"))) == [3, 4, 6, 8]
    assert os.path.exists(os.path.join(uninterrupted, "curves.png"))
    assert all(np.isfinite(r["loss"]) for r in records)


def test_a_stop_signal_checkpoints_and_the_resumed_run_equals_the_uninterrupted_one(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    parallel_train_step = train.Setup.parallel_train_step

    def signalled_after_step_5(setup, devices=None):
        step_fn, calls = parallel_train_step(setup, devices), []

        def step(state, batch):
            calls.append(1)
            if len(calls) == 5:
                signal.raise_signal(signal.SIGTERM)  # as a scheduler's preemption would
            return step_fn(state, batch)

        return step

    monkeypatch.setattr(train.Setup, "parallel_train_step", signalled_after_step_5)
    handler = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path / "stopped")
    assert loop.train_and_evaluate(tiny_config(), workdir, tiny_dataset(), config_path="configs/tiny.py") is False
    assert "stopped by SIGTERM at step 5; checkpoint saved. Resume with: python run.py --config configs/tiny.py" in (
        capsys.readouterr().out
    )
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 4, 5]
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's own handler is gone again

    monkeypatch.undo()
    assert loop.train_and_evaluate(tiny_config(), workdir, tiny_dataset()) is True
    reference = read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
    assert strip(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == strip(reference)
    chex.assert_trees_all_equal(
        final_state(workdir, tiny_config(), tiny_dataset()), final_state(uninterrupted, tiny_config(), tiny_dataset())
    )
