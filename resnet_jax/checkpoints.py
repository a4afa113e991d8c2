"""orbax checkpoints of the whole train state (the data and the augmentation are pure functions of
the step): save, restore with fallback to an earlier checkpoint, and step lookup. orbax writes each
to a temporary folder renamed when complete, so a kill during a save leaves the earlier ones intact."""

import contextlib
import functools
import logging
import os
import sys
from typing import Optional

import flax.serialization
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from resnet_jax import cluster, parallel
from resnet_jax.errors import Error, RunFailure, first_line


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep` most recent checkpoints plus the best by validation accuracy (only
    checkpoints saved with metrics, which runs with a validation split give); saves asynchronously."""
    best = BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False)
    policy = AnyPreservationPolicy([LatestN(n=keep), best])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        best_fn=_best_metric,
        best_mode="max",
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _best_metric(metrics: dict) -> float:
    # The best is chosen on validation accuracy alone; metrics holding only a test "accuracy" rank last.
    return metrics.get("validation_accuracy", float("-inf"))


def save(manager: ocp.CheckpointManager, state, metrics: Optional[dict] = None) -> None:
    """Starts an asynchronous save of the (unreplicated, host) state at its step."""
    step = int(state.step)
    try:
        args = ocp.args.StandardSave(flax.serialization.to_state_dict(state))
        manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # a multi-process save's collectives fail too when a process is lost
        failure = RunFailure(f"a checkpoint save failed before step {step} ({_short(e)}); training stopped")
        raise cluster.lost_process(e) or failure from None


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until pending saves are on disk; a failed save stops the run."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        failure = RunFailure(f"writing a checkpoint failed ({_short(e)}); training stopped")
        raise cluster.lost_process(e) or failure from None


def close(manager: ocp.CheckpointManager) -> None:
    """Releases orbax's threads, also after a failed save (already reported by `wait`/`save`)."""
    with contextlib.suppress(Exception):  # the failure was reported where it happened
        manager.close()


# What evaluation, predict and export read: not the optimizer state, whose layout may be another optimizer's.
EVAL_PARTS = ("step", "params", "batch_stats", "ema")


def _restore_step(manager, step: int, template, parts=None):
    """The checkpoint of `step` into `template`; with `parts`, only those fields, the rest `template`'s."""
    _drop_failed_restore_noise()
    full = flax.serialization.to_state_dict(template)
    if parts is None:
        restored = manager.restore(step, args=ocp.args.StandardRestore(full))
    else:
        saved = manager.restore(step, args=ocp.args.StandardRestore())
        restored = {**full, **{part: saved[part] for part in parts}}
    return flax.serialization.from_state_dict(template, restored)


_short = functools.partial(first_line, with_type=True, limit=200)  # an exception, in one line for a message


def _drop_failed_restore_noise() -> None:
    """Silences the errors of the tensorstore reads a failed restore leaves on orbax's closed event loop (from
    other threads, or asyncio's "Task exception was never retrieved"): nothing new. Called before each restore."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if getattr(sys.unraisablehook, "drops_closed_loop_errors", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def restore_latest(manager: ocp.CheckpointManager, template, quarantine: Optional[str] = None, parts=None):
    """The newest usable checkpoint (only its `parts`, if given) into `template`, or `template` if none.
    Every process must call it: all skip, with a warning, one that any cannot read (moved to `quarantine`
    so that training saves those steps again). An Error if none is usable: training must not start over."""
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            state, failure = _restore_step(manager, step, template, parts), None
        except Exception as e:  # A truncated, deleted or corrupt file: try the one before.
            failure = e
        if parallel.any_process(failure is not None):
            reason = _short(failure) if failure else "unreadable on another process"
            logging.warning("checkpoint at step %d is unusable (%s); trying an earlier one", step, reason)
            continue
        if i:
            if quarantine:
                os.makedirs(quarantine, exist_ok=True)
                for bad in steps[:i]:
                    os.replace(os.path.join(manager.directory, str(bad)), os.path.join(quarantine, str(bad)))
                logging.warning(
                    "skipped unusable checkpoints %s (moved to %s); resuming from step %d", steps[:i], quarantine, step
                )
            parallel.sync("checkpoints.restore_latest")  # every process sees the quarantine done, then forgets
            manager.reload()  # the skipped steps, which training saves again
        return state
    if steps:
        raise Error(
            f"no usable checkpoint in {manager.directory} (steps {', '.join(map(str, steps))} are all "
            f"unreadable); not starting over on top of them: move them away or use a new --workdir"
        )
    return template


def select_step(manager: ocp.CheckpointManager, which: str) -> int:
    """The step `which` names ("latest", "best" or a step number); an Error if there is none."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise Error(f"no checkpoint in {manager.directory}: train first, or point --workdir at a trained run")
    if which == "latest":
        return steps[-1]
    if which == "best":
        step = manager.best_step()
        if step is None or _best_metric(manager.metrics(step) or {}) == float("-inf"):
            raise Error(
                f"no 'best' checkpoint in {manager.directory}: that run had no validation split, and the test split "
                f"never selects a checkpoint (its accuracy would then be optimistic). Use 'latest' or a step number, "
                f"or train with --config.data.validation_examples=5000"
            )
    else:
        try:
            step = int(which)
        except ValueError:
            raise Error(f"eval_checkpoint_step must be 'latest', 'best' or a step number, got {which!r}") from None
    if step not in steps:
        raise Error(f"no checkpoint at step {which} in {manager.directory}; available: {', '.join(map(str, steps))}")
    return step


def restore_for_eval(manager: ocp.CheckpointManager, template, which: str):
    """Restores the `EVAL_PARTS` of the checkpoint `which` names: "latest", "best" or a step number."""
    step = select_step(manager, which)
    if which == "latest":
        return restore_latest(manager, template, parts=EVAL_PARTS)
    try:
        return _restore_step(manager, step, template, EVAL_PARTS)
    except Exception as e:
        raise Error(f"checkpoint at step {step} in {manager.directory} is unreadable ({_short(e)})") from None


def restore_variables(workdir: str, which: str):
    """(step, {"params", "batch_stats"} as numpy) of the checkpoint `which` names in another run's
    `workdir`, read without a template (its architecture may differ); its moving average if it kept one."""
    manager = create_manager(workdir, 1, read_only=True)
    step = which
    try:
        step = select_step(manager, which)
        _drop_failed_restore_noise()
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    except Error:
        raise
    except Exception as e:
        raise Error(f"checkpoint at step {step} in {manager.directory} is unreadable ({_short(e)})") from None
    finally:
        manager.close()
    weights = restored["ema"] if restored.get("ema") else restored
    return step, {"params": weights["params"], "batch_stats": weights["batch_stats"]}
