"""orbax checkpoints of the train state: save, restore with fallback, and step lookup.

A checkpoint holds everything needed to continue exactly: params, batch_stats,
optimizer state and step (the data position and augmentation randomness are pure
functions of the step). orbax writes each checkpoint to a temporary folder and renames
it when complete, so a kill during a save leaves the previous checkpoints intact; the
temporary folder is removed at the next start.
"""

import logging
import os
from typing import Optional

import flax.serialization
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from resnet_jax.errors import Error, RunFailure


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep` most recent checkpoints plus the best by test accuracy; saves asynchronously."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["accuracy"], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        best_fn=lambda m: m["accuracy"],
        best_mode="max",
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state, metrics: Optional[dict] = None) -> None:
    """Starts an asynchronous save of the (unreplicated, host) state at its step."""
    step = int(state.step)
    try:
        manager.save(
            step,
            args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            metrics=metrics,
            force=True,
        )
    except Exception as e:
        raise RunFailure(f"saving the checkpoint at step {step} failed: {e}; training stopped") from None


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until pending saves are on disk; a failed save stops the run."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise RunFailure(f"writing a checkpoint failed: {e}; training stopped") from None


def _restore_step(manager, step: int, template):
    restored = manager.restore(
        step, args=ocp.args.StandardRestore(flax.serialization.to_state_dict(template))
    )
    return flax.serialization.from_state_dict(template, restored)


def restore_latest(manager: ocp.CheckpointManager, template):
    """Restores the newest usable checkpoint into `template`, skipping (with a warning) any
    that cannot be read. Returns `template` if there are none; raises if all are unusable."""
    steps = sorted(manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        try:
            return _restore_step(manager, step, template)
        except Exception as e:  # A truncated, deleted or corrupt file: try the one before.
            skipped.append(step)
            logging.warning("checkpoint at step %d is unusable (%s); trying an earlier one", step, e)
    if steps:
        raise Error(
            f"no usable checkpoint in {manager.directory} (steps {', '.join(map(str, steps))} are all "
            f"unreadable); not starting over on top of them: move them away or use a new --workdir"
        )
    return template


def restore_for_eval(manager: ocp.CheckpointManager, template, which: str):
    """Restores the checkpoint `which` names: "latest", "best" or a step number."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise Error(f"no checkpoint in {manager.directory}: train first, or point --workdir at a trained run")
    if which == "latest":
        return restore_latest(manager, template)
    if which == "best":
        step = manager.best_step()
    else:
        try:
            step = int(which)
        except ValueError:
            raise Error(
                f"eval_checkpoint_step must be 'latest', 'best' or a step number, got {which!r}"
            ) from None
    if step not in steps:
        raise Error(
            f"no checkpoint at step {which} in {manager.directory}; available: {', '.join(map(str, steps))}"
        )
    try:
        return _restore_step(manager, step, template)
    except Exception as e:
        raise Error(f"checkpoint at step {step} in {manager.directory} is unreadable: {e}") from None


def first_replica(tree):
    """This process's first-device copy of a replicated (pmapped) tree, as host numpy arrays.

    Reads local data only: indexing `x[0]` would be a cross-process computation in a
    multi-host run.
    """
    return jax.device_get(jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree))
