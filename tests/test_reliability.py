"""Faults never lose saved work: each test provokes the failure for real and checks what is kept."""

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TWO_HOSTS, finish, flags_launch, run_cli, start_processes, wait_until
from resnet_jax import workdir as workdir_lib
from resnet_jax.errors import Error
from resnet_jax.workdir import read_metrics


def args(data_dir, workdir, steps, *extra):
    return (
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={steps}",
        "--config.log_every_steps=5",
        "--config.checkpoint_every_steps=10",
        "--config.eval_every_epochs=100",
        *extra,
    )


def steps_on_disk(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def snapshot(workdir):
    """Every file under workdir/checkpoints with its size and mtime: 'intact' means unchanged."""
    out = {}
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


def one_line_error(result, code):
    assert result.returncode == code, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def ten_steps(tiny_data_dir, tmp_path_factory):
    """A workdir trained for 20 steps (checkpoints 10 and 20), copied by the tests that damage it."""
    workdir = tmp_path_factory.mktemp("ten") / "run"
    result = run_cli(*args(tiny_data_dir, workdir, 20))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_on_disk(workdir) == [10, 20]
    return workdir


def copy_of(workdir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(workdir, target)
    return target


def partial_saves(workdir):
    """The checkpoint folders a save is still writing: orbax names them STEP.orbax-checkpoint-tmp*
    until the save completes, then renames them STEP."""
    return sorted(
        d for d in os.listdir(os.path.join(workdir, "checkpoints")) if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", d)
    )


def saving_past(process, workdir, before) -> bool:
    """Whether `process` ended, or saved past the steps `before` (and more) and writes a save now."""
    if process.poll() is not None:
        return True
    done = steps_on_disk(workdir) if (workdir / "checkpoints").exists() else []
    return bool(done) and done[-1] > (before or [0])[-1] + 2 and bool(partial_saves(workdir))


@pytest.mark.slow
def test_kill_9_during_saves_never_loses_a_complete_checkpoint(tiny_data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "run.py"),
        *args(tiny_data_dir, workdir, 40, "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2"),
    ]
    mid_save, attempts = [], 0
    while len(mid_save) < 3 and attempts < 6:
        attempts += 1
        before = steps_on_disk(workdir) if (workdir / "checkpoints").exists() else []
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Once this run has saved (a checkpoint newer than it started from, so the leftovers of the
        # last kill are cleaned up), the next save's temporary folder appears: kill it then.
        wait_until(functools.partial(saving_past, process, workdir, before), 120, interval=0.001)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
        # A save's folder left under its temporary name: the kill landed while that save was
        # being written (one that completed between the look and the kill is tried again).
        partial = partial_saves(workdir) if (workdir / "checkpoints").exists() else []
        if partial:
            mid_save.append(partial)
            # What is left: complete checkpoints beside the partial one, none taken for it.
            assert steps_on_disk(workdir), "a kill lost every checkpoint"
            assert int(partial[-1].split(".")[0]) > steps_on_disk(workdir)[-1], (partial, steps_on_disk(workdir))
    assert len(mid_save) == 3, f"{len(mid_save)} of {attempts} kills landed during a save: {mid_save}"
    assert (workdir / "lock").exists()  # stale: its process is dead

    # Checkpoint folders are named by their step only once complete (orbax renames them then): the
    # newest one on disk is the step the restart must resume from, with nothing skipped.
    newest = steps_on_disk(workdir)[-1]
    result = run_cli(
        *args(tiny_data_dir, workdir, 40, "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from the checkpoint at step {newest}\n" in result.stderr, result.stderr[-3000:]
    assert "unusable" not in result.stderr  # no checkpoint skipped by the fallback ...
    assert not (workdir / "unusable_checkpoints").exists()  # ... nor quarantined
    leftovers = [d for d in os.listdir(workdir / "checkpoints") if not d.isdigit()]
    assert leftovers == []  # partial saves were cleaned up
    assert steps_on_disk(workdir)[-1] == 40
    records = read_metrics(str(workdir / "metrics.jsonl"))
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) and (40, "test") in keys  # never two lines for one (step, split)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    manifest = workdir / "checkpoints" / "20" / "default" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])  # truncated
    result = run_cli(*args(tiny_data_dir, workdir, 30))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 20 is unusable" in result.stderr
    assert "resumed from the checkpoint at step 10" in result.stderr
    assert steps_on_disk(workdir) == [10, 20, 30]  # 20 saved again, from the resumed run
    assert os.path.exists(workdir / "unusable_checkpoints" / "20" / "default" / "manifest.ocdbt")  # kept aside


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_lost_process_stops_the_other_and_the_same_commands_resume(tiny_data_dir, tmp_path):
    reference = tmp_path / "uninterrupted"
    for result in finish(start_processes(args(tiny_data_dir, reference, 20), flags_launch())):
        assert result.returncode == 0, result.stderr[-3000:]

    workdir, launch = tmp_path / "run", flags_launch()
    command = args(tiny_data_dir, workdir, 20, "--heartbeat_timeout=10")
    processes = start_processes(command, launch)
    wait_until((workdir / "checkpoints" / "10").exists, 240)
    processes[1].send_signal(signal.SIGKILL)  # a host lost
    killed = time.time()
    survivor, _ = finish(processes, timeout=120)
    elapsed = time.time() - killed
    if survivor.returncode == 1:  # its next collective failed: gloo saw the connection close
        line = one_line_error(survivor, 1)
        assert "a computation across the 2 processes failed" in line and "start all 2 again with the same" in line
    else:  # its collective waits for the dead peer (as NCCL's do): jax ends it after the heartbeat timeout
        assert survivor.returncode == -signal.SIGABRT, survivor.stderr[-3000:]
        assert "stopped sending heartbeats" in survivor.stderr
    assert elapsed < 40  # bounded by --heartbeat_timeout, not jax's 100 s
    assert steps_on_disk(workdir) == [10]

    for result in finish(start_processes(command, launch)):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from the checkpoint at step 10" in result.stderr
    assert steps_on_disk(workdir) == [10, 20]
    resumed, uninterrupted = (
        [(r["step"], r["split"], r["loss"], r["accuracy"]) for r in read_metrics(str(w / "metrics.jsonl"))]
        for w in (workdir, reference)
    )
    assert resumed == uninterrupted  # bitwise: every step, loss and accuracy


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_frozen_process_ends_the_others_after_the_heartbeat_timeout(tiny_data_dir, tmp_path):
    workdir = tmp_path / "run"
    processes = start_processes(args(tiny_data_dir, workdir, 20, "--heartbeat_timeout=5"), flags_launch())
    wait_until((workdir / "checkpoints" / "10").exists, 240)
    processes[1].send_signal(signal.SIGSTOP)  # a hung host: its sockets stay open, so no collective fails
    stopped = time.time()
    try:
        survivor = finish(processes[:1], timeout=120)[0]
    finally:
        processes[1].kill()
        processes[1].wait()
    # jax's coordinator misses process 1's heartbeats for 5 s (counted from the last one it sent,
    # so sooner after the stop) and ends the others (SIGABRT, exit 134): not after the default 60 s.
    elapsed = time.time() - stopped
    assert survivor.returncode == -signal.SIGABRT, survivor.stderr[-3000:]
    assert "stopped sending heartbeats" in survivor.stderr
    assert elapsed < 30
    assert steps_on_disk(workdir) == [10]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_skip_the_same_corrupt_checkpoint_and_resume_together(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    manifest = workdir / "checkpoints" / "20" / "default" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])  # truncated, on the workdir both processes share
    results = finish(start_processes(args(tiny_data_dir, workdir, 30), flags_launch()))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "checkpoint at step 20 is unusable" in result.stderr
        assert "resumed from the checkpoint at step 10" in result.stderr
    assert steps_on_disk(workdir) == [10, 20, 30]  # 20 saved again, from the resumed run
    assert os.path.exists(workdir / "unusable_checkpoints" / "20" / "default" / "manifest.ocdbt")
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl")) if r["split"] == "train"] == [
        5,
        10,
        15,
        20,
        25,
        30,
    ]


# run.py for which process 1 of a run finds the checkpoint at CORRUPT_STEP corrupt, as after a
# read through a cache of its own that returned damaged bytes: orbax reads the step, then the read
# fails on that process only. The other process reads the same files and finds them whole.
RUN_WITH_ONE_PROCESS_UNABLE_TO_READ = """
import runpy, sys
import orbax.checkpoint as ocp
restore = ocp.CheckpointManager.restore
def restore_or_fail(manager, step, *args, **kwargs):
    restored = restore(manager, step, *args, **kwargs)
    if step == CORRUPT_STEP and "--process_id=1" in sys.argv:
        raise ValueError(f"checkpoint {step} corrupt on this process only")
    return restored
ocp.CheckpointManager.restore = restore_or_fail
sys.argv[0] = "run.py"
runpy.run_path("run.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_checkpoint_one_process_cannot_read_is_skipped_by_both(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    script = RUN_WITH_ONE_PROCESS_UNABLE_TO_READ.replace("CORRUPT_STEP", "20")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args(tiny_data_dir, workdir, 20), *flags],
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **TWO_HOSTS, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags, env in flags_launch()
    ]
    try:
        first, second = finish(processes, timeout=180)
    except subprocess.TimeoutExpired:  # as when the processes resume from different steps and wait on each other
        resumed = [re.findall(r"resumed from the checkpoint at step \d+", p.communicate()[1]) for p in processes]
        pytest.fail(f"the two processes did not finish in 180 s; process 0, then 1: {resumed}")
    for result in (first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 20 is unusable (ValueError: checkpoint 20 corrupt on this process only)" in second.stderr
    assert "checkpoint at step 20 is unusable (unreadable on another process)" in first.stderr, first.stderr[-3000:]
    for result in (first, second):
        assert "resumed from the checkpoint at step 10" in result.stderr, result.stderr[-3000:]
    assert steps_on_disk(workdir) == [10, 20]  # 20 saved again, from the resumed run
    assert os.path.exists(workdir / "unusable_checkpoints" / "20")
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl")) if r["split"] == "train"] == [5, 10, 15, 20]


@pytest.mark.slow
def test_no_usable_checkpoint_refuses_to_start_over(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    for step in (10, 20):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "default" / "d")  # the array data is gone
    before = snapshot(workdir)
    line = one_line_error(run_cli(*args(tiny_data_dir, workdir, 30)), 2)
    assert "no usable checkpoint" in line and "steps 20, 10 are all unreadable" in line
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    before = snapshot(workdir)
    # An infinite learning rate: step 21 still computes its loss with the finite weights of checkpoint 20,
    # then its update makes them inf/NaN, so step 22 is the first non-finite loss. The check finds it
    # at the next record (step 25) and must name step 22, not the step it looked at.
    result = run_cli(*args(tiny_data_dir, workdir, 40, "--config.learning_rate=inf"))
    line = one_line_error(result, 1)
    assert re.search(r"\(not finite\) at step (\d+);", line).group(1) == "22", line
    assert re.search(r"the last good checkpoint is step (\d+) ", line).group(1) == "20", line
    assert steps_on_disk(workdir) == [10, 20]
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_a_second_run_on_the_same_workdir_refuses_to_start(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    first = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run.py"), *args(tiny_data_dir, workdir, 100000)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until((workdir / "lock").exists, 60)
        owner = json.loads((workdir / "lock").read_text())
        assert owner == {"pid": first.pid, "host": socket.gethostname()}
        line = one_line_error(run_cli(*args(tiny_data_dir, workdir, 100000)), 2)
        assert f"is in use by pid {first.pid} on {socket.gethostname()}" in line
        assert first.poll() is None  # the first run carries on
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = workdir_lib.Lock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    # A live owner (this process, seen from a second lock) is respected.
    with pytest.raises(Error, match="is in use by pid"):
        workdir_lib.Lock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / "lock").exists()


@pytest.mark.slow
def test_unwritable_workdir_is_reported_at_start(tiny_data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_line_error(run_cli(*args(tiny_data_dir, blocker / "run", 10)), 2)
    assert f"cannot write to workdir {blocker / 'run'}" in line


@pytest.mark.slow
def test_a_failed_save_during_the_run_stops_training(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run.py"), *args(tiny_data_dir, workdir, 100000)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = workdir / "metrics.jsonl"
        wait_until(lambda: '"step": 25' in metrics.read_text(), 120)
        # The disk "fails": the checkpoint folder is replaced by a file, so the save at step 30 cannot be written.
        shutil.move(workdir / "checkpoints", tmp_path / "saved")
        (workdir / "checkpoints").write_text("")
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "checkpoint" in stderr.splitlines()[-1] and "training stopped" in stderr.splitlines()[-1]
    assert sorted(os.listdir(tmp_path / "saved")) == ["10", "20"]


@pytest.mark.slow
def test_config_change_that_breaks_resume_is_refused(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    before = snapshot(workdir)
    line = one_line_error(
        run_cli(*args(tiny_data_dir, workdir, 30, "--config.batch_size=32", "--config.model.num_filters=4")), 2
    )
    assert "model.num_filters: 8 -> 4" in line and "batch_size: 64 -> 32" in line
    assert "--config.allow_config_change=True" in line
    assert snapshot(workdir) == before
    # Harmless changes (the learning rate, the length) resume as usual.
    result = run_cli(*args(tiny_data_dir, workdir, 30, "--config.learning_rate=0.05"))
    assert result.returncode == 0 and steps_on_disk(workdir) == [10, 20, 30], result.stderr[-3000:]


@pytest.mark.slow
def test_config_change_with_allow_config_change_resumes_and_trains_on(ten_steps, tiny_data_dir, tmp_path):
    workdir = copy_of(ten_steps, tmp_path)
    result = run_cli(*args(tiny_data_dir, workdir, 30, "--config.batch_size=32", "--config.allow_config_change=True"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step 20\n" in result.stderr, result.stderr[-3000:]
    assert steps_on_disk(workdir) == [10, 20, 30]
    records = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(r["loss"]) for r in records)
    # It trained on at the new batch size: 32 of the 640 images a step, 20 steps an epoch.
    assert [r["epoch"] for r in records if r["split"] == "train"][-2:] == [25 / 20, 30 / 20]
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 32


@pytest.mark.slow
def test_eval_without_checkpoints_or_with_a_missing_step(ten_steps, tiny_data_dir, tmp_path):
    line = one_line_error(
        run_cli(
            "--config",
            "configs/smoke.py",
            "--workdir",
            str(tmp_path / "empty"),
            "--mode",
            "eval",
            f"--config.data.data_dir={tiny_data_dir}",
        ),
        2,
    )
    assert "no checkpoint in" in line and "train first" in line
    line = one_line_error(
        run_cli(
            "--config",
            "configs/smoke.py",
            "--workdir",
            str(ten_steps),
            "--mode",
            "eval",
            f"--config.data.data_dir={tiny_data_dir}",
            "--config.eval_checkpoint_step=15",
        ),
        2,
    )
    assert "no checkpoint at step 15" in line and "available: 10, 20" in line
    line = one_line_error(
        run_cli(
            "--config",
            "configs/smoke.py",
            "--workdir",
            str(ten_steps),
            "--mode",
            "eval",
            f"--config.data.data_dir={tiny_data_dir}",
            "--config.eval_checkpoint_step=best",
        ),
        2,
    )
    assert "no 'best' checkpoint" in line and "no validation split" in line
    assert "--config.data.validation_examples=5000" in line


@pytest.mark.slow
def test_missing_or_corrupt_data_through_run_py(tiny_data_dir, tmp_path):
    line = one_line_error(
        run_cli(*args(str(tmp_path / "nothing"), tmp_path / "w", 10, f"--config.data.archive={tmp_path}/none")), 2
    )
    assert "cifar10 3.0.2 is not prepared in" in line and "--config.data.data_dir" in line
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data_dir, broken)
    shard = broken / "cifar10" / "3.0.2" / "cifar10-train.array_record-00000-of-00001"
    shard.write_bytes(b"\0" * 1000)
    line = one_line_error(run_cli(*args(str(broken), tmp_path / "w2", 10)), 2)
    assert "cannot read the train split of cifar10" in line and "prepare the data set again" in line


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "split": "train", "loss": 1.0}\n{"step": 10, "spl')
    log = workdir_lib.MetricsLog(str(tmp_path))
    log.write({"step": 5, "split": "train", "loss": 1.0})  # already there: skipped
    log.write({"step": 10, "split": "train", "loss": 0.5})
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [
        {"step": 5, "split": "train", "loss": 1.0},
        {"step": 10, "split": "train", "loss": 0.5},
    ]
