"""The train loop in-process, on a tiny in-memory data set, in seconds: the periodic actions fall
due as their predicates say, a stop signal checkpoints and returns, the resumed run ends exactly
where an uninterrupted one does under the same device layout, and a checkpoint of one layout
resumes under the other."""

import os
import shutil
import signal
import types

import chex
import flax.serialization
import numpy as np
import pytest

from configs import airbench94, smoke
from resnet_jax import checkpoints, evaluate, loop, train
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


def tiny_config(layout="pmap"):
    config = smoke.get_config()
    config.model.num_filters = 4
    config.batch_size, config.eval_batch_size, config.num_train_steps = 32, 16, STEPS
    config.log_every_steps, config.eval_every_epochs, config.checkpoint_every_steps = 3, 1.0, 3
    config.ema_decay, config.keep_checkpoints, config.parallel = 0.9, 10, layout
    # Mixup and CutMix on, so that resume (bitwise) and the cross-layout resume are checked with them too.
    config.mixup_alpha, config.cutmix_alpha = 0.4, 1.0
    return config


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def metrics(workdir):
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def final_state(workdir):
    manager = checkpoints.create_manager(str(workdir), 10, read_only=True)
    template = train.Setup(tiny_config(), tiny_dataset()).fresh_state
    return flax.serialization.to_state_dict(checkpoints.restore_latest(manager, template))


def train_to_the_end(workdir, layout):
    assert loop.train_and_evaluate(tiny_config(layout), str(workdir), tiny_dataset()) is True
    return workdir


def stop_after(workdir, layout, step=5, config=None, dataset=None):
    """Trains under `layout` until a SIGTERM arrives during `step`, as a scheduler's preemption
    would (by default the tiny config and data set; tests/test_airbench.py passes its own)."""
    parallel_train_step = train.Setup.parallel_train_step

    def signalled(setup, devices=None):
        step_fn, calls = parallel_train_step(setup, devices), []

        def signalling_step(state, batch):
            calls.append(1)
            if len(calls) == step:
                signal.raise_signal(signal.SIGTERM)
            return step_fn(state, batch)

        return signalling_step

    config = tiny_config(layout) if config is None else config
    dataset = tiny_dataset() if dataset is None else dataset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Setup, "parallel_train_step", signalled)
        done = loop.train_and_evaluate(config, str(workdir), dataset, config_path="configs/tiny.py")
    assert done is False
    return workdir


@pytest.fixture(scope="module", params=["pmap", "sharded"])
def runs(request, tmp_path_factory):
    """An uninterrupted run and one stopped at step 5, under the layout `request.param`."""
    layout = request.param
    return {
        "layout": layout,
        "uninterrupted": train_to_the_end(tmp_path_factory.mktemp(f"{layout}_uninterrupted"), layout),
        "stopped": stop_after(tmp_path_factory.mktemp(f"{layout}_stopped"), layout),
    }


def test_each_periodic_action_falls_due_as_its_predicate_says():
    due = loop.Due(num_steps=10, log_every=3, eval_every=4, checkpoint_every=5)
    steps = range(1, 11)
    assert [s for s in steps if due.log(s)] == [3, 6, 9, 10]
    assert [s for s in steps if due.evaluation(s)] == [4, 8, 10]
    assert [s for s in steps if due.checkpoint(s)] == [5, 10]
    assert [s for s in steps if due.stop_check(s)] == list(range(1, 10))  # one process: after every step but the last


def test_an_evaluation_interval_of_the_whole_run_evaluates_once_at_its_last_step():
    """airbench94's 9.9 epochs of 48 steps are 476 steps (475.2 rounded up): evaluating every 9.9
    epochs is once, at step 476, not also at round(475.2) = 475. So is any other fraction."""
    config = airbench94.get_config()
    for epochs, steps_per_epoch in ((9.9, 48), (2.5, 97), (7.01, 10), (3.0, 7)):
        config.num_epochs = config.eval_every_epochs = epochs
        setup = types.SimpleNamespace(steps_per_epoch=steps_per_epoch)
        setup.num_steps = train.total_steps(config, steps_per_epoch)
        due = loop.Due.from_config(config, setup)
        assert [s for s in range(1, setup.num_steps + 1) if due.evaluation(s)] == [setup.num_steps], epochs
    assert setup.num_steps == 21
    config.num_epochs, config.eval_every_epochs = 9.9, 1.0  # a shorter interval: its multiples, and the end
    setup = types.SimpleNamespace(steps_per_epoch=48, num_steps=476)
    due = loop.Due.from_config(config, setup)
    assert [s for s in range(1, 477) if due.evaluation(s)] == [48 * e for e in range(1, 10)] + [476]


def test_the_loop_logs_evaluates_and_checkpoints_on_schedule(runs):
    records = metrics(runs["uninterrupted"])
    assert [(r["step"], r["split"]) for r in records] == [
        (3, "train"), (4, "validation"), (4, "test"), (6, "train"),
        (8, "train"), (8, "validation"), (8, "test"),
    ]  # fmt: skip
    assert [("compile_seconds" in r) for r in records if r["split"] == "train"] == [True, False, False]
    # Every 3 steps, and after each evaluation (with the validation accuracy the best one is chosen on).
    assert sorted(int(s) for s in os.listdir(os.path.join(runs["uninterrupted"], "checkpoints"))) == [3, 4, 6, 8]
    assert os.path.exists(os.path.join(runs["uninterrupted"], "curves.png"))
    assert all(np.isfinite(r["loss"]) for r in records)


def test_a_stop_signal_checkpoints_and_the_resumed_run_equals_the_uninterrupted_one(runs, tmp_path):
    stopped = runs["stopped"]
    assert sorted(int(s) for s in os.listdir(os.path.join(stopped, "checkpoints"))) == [3, 4, 5]
    handler = signal.getsignal(signal.SIGTERM)
    workdir = shutil.copytree(stopped, tmp_path / "resumed")
    train_to_the_end(workdir, runs["layout"])
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's own handler is gone again
    assert strip(metrics(workdir)) == strip(metrics(runs["uninterrupted"]))
    chex.assert_trees_all_equal(final_state(workdir), final_state(runs["uninterrupted"]))


def test_the_stop_says_how_to_resume(tmp_path, capsys):
    stop_after(tmp_path, "pmap")
    assert "stopped by SIGTERM at step 5; checkpoint saved. Resume with: python run.py --config configs/tiny.py" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_of_one_layout_resumes_under_the_other(runs, tmp_path):
    other = {"pmap": "sharded", "sharded": "pmap"}[runs["layout"]]
    workdir = train_to_the_end(shutil.copytree(runs["stopped"], tmp_path / "resumed"), other)
    resumed, reference = strip(metrics(workdir)), strip(metrics(runs["uninterrupted"]))
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in reference]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in reference], rtol=1e-4)
    chex.assert_trees_all_close(final_state(workdir), final_state(runs["uninterrupted"]), rtol=1e-4, atol=1e-5)


def test_the_best_checkpoint_outlives_the_keep_window_and_eval_best_evaluates_it(tmp_path):
    """The best checkpoint (by validation accuracy) is an early one, with more than keep_checkpoints
    saved after it: it stays on disk outside the window of the latest, and eval_checkpoint_step=best
    restores it, not the latest."""
    config = tiny_config()
    # An evaluation, and so a checkpoint with its validation accuracy, every 2 steps (2, 4, 6, 8);
    # no other checkpoints. The 2 latest are kept, and the best.
    config.eval_every_epochs, config.checkpoint_every_steps, config.keep_checkpoints = 0.5, 100, 2
    # Which step is best is forced: the validation accuracy the loop sees is scripted per step (its
    # own metrics log records the same), highest at step 2, and second highest at the latest.
    scripted = {2: 0.9, 4: 0.5, 6: 0.6, 8: 0.7}
    real_evaluate_split = loop.evaluate_split

    def evaluate_split(setup, p_eval_step, state, images, labels):
        result = real_evaluate_split(setup, p_eval_step, state, images, labels)
        if images is setup.dataset.validation_images:
            result["accuracy"] = scripted[int(setup.layout.unreplicate(state.step))]
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "evaluate_split", evaluate_split)
        assert loop.train_and_evaluate(config, str(tmp_path), tiny_dataset()) is True
    validation = [(r["step"], r["accuracy"]) for r in metrics(tmp_path) if r["split"] == "validation"]
    assert validation == sorted(scripted.items())
    best = max(validation, key=lambda r: r[1])[0]
    assert best == 2

    on_disk = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert on_disk == [2, 6, 8]  # the best, older than the keep window [6, 8], is still there
    manager = checkpoints.create_manager(str(tmp_path), config.keep_checkpoints, read_only=True)
    assert manager.best_step() == best != manager.latest_step() == 8
    manager.close()

    config.eval_checkpoint_step = "best"
    report = evaluate.evaluate_checkpoint(config, str(tmp_path), tiny_dataset())
    assert report["step"] == best
    assert os.path.exists(tmp_path / f"eval_{best}.json")


def test_profile_steps_traces_the_steps_after_the_compiling_one_into_the_workdir(tmp_path, caplog):
    config = tiny_config()
    config.profile_steps = 2
    caplog.set_level("INFO")
    assert loop.train_and_evaluate(config, str(tmp_path), tiny_dataset()) is True
    assert "a trace of steps 2-3 is in " + str(tmp_path / "profile") in caplog.text
    traces = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path / "profile") for f in fs]
    assert any(t.endswith(".xplane.pb") for t in traces), traces  # TensorBoard's profile plugin reads these
    assert any(t.endswith("perfetto_trace.json.gz") for t in traces), traces  # and Perfetto these
    assert strip(metrics(tmp_path)) == strip(metrics(train_to_the_end(tmp_path / "plain", "pmap")))
