"""The train loop: train steps and between them the periodic actions `Due` names (after big_vision's
`itstime`); `Run` holds what the loop keeps besides the state. The modes evaluate with `evaluate_split`."""

import dataclasses
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import checkpoints, finetune, parallel, plots, train, workdir as workdir_lib
from resnet_jax.data import pipeline, registry
from resnet_jax.errors import RunFailure


def train_and_evaluate(config, workdir: str, dataset=None, config_path: str = "CONFIG") -> bool:
    """Trains, evaluates and checkpoints, resuming from `workdir`'s latest checkpoint; False if a signal stopped it."""
    setup = train.Setup(config, dataset or registry.load_dataset(config.data))
    run = Run(config, workdir, setup)
    try:
        state = run.starting_state()
        start_step = int(state.step)
        due = Due.from_config(config, setup)
        p_train_step, p_eval_step = setup.parallel_train_step(), setup.parallel_eval_step()
        state, batches = setup.layout.replicate(state), setup.train_batches(start_step)
        run.begin(start_step)
        with StopSignal() as stop:
            for step in range(start_step + 1, setup.num_steps + 1):
                state = p_train_step(state, next(batches))
                run.stepped(step, state, due.log(step))
                if config.profile_steps:
                    run.profile(step, state)
                if due.log(step):
                    state = run.log_train(step, state)
                if due.evaluation(step):
                    run.save(step, state, run.evaluate_and_record(step, state, p_eval_step))
                    run.lap(step)
                elif due.checkpoint(step):
                    run.save(step, state)
                if due.stop_check(step) and stop.requested():
                    run.stop(step, state, stop.received, config_path)
                    return False
        checkpoints.wait(run.manager)
        return True
    finally:
        run.close(failed=sys.exc_info()[1] is not None)


def itstime(step: int, every: int, last: int) -> bool:
    """Whether an action done every `every` steps is due at `step`: at its multiples, and at the `last` step."""
    return step % every == 0 or step == last


@dataclasses.dataclass(frozen=True)
class Due:
    """When each periodic action is due, in steps (the config's epochs converted once)."""

    num_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, config, setup) -> "Due":
        interval = config.eval_every_epochs * setup.steps_per_epoch
        # An interval as long as the run (rounded up, as `train.total_steps` rounds the run) evaluates once, at the end.
        eval_every = setup.num_steps if math.ceil(interval) >= setup.num_steps else max(1, int(round(interval)))
        return cls(setup.num_steps, config.log_every_steps, eval_every, config.checkpoint_every_steps)

    def log(self, step: int) -> bool:
        return itstime(step, self.log_every, self.num_steps)

    def evaluation(self, step: int) -> bool:
        return itstime(step, self.eval_every, self.num_steps)

    def checkpoint(self, step: int) -> bool:
        return itstime(step, self.checkpoint_every, self.num_steps)

    def stop_check(self, step: int) -> bool:
        """One process reads its own signal flag after every step. Several must agree, which costs
        a collective, so they compare flags at the logging interval only."""
        return step < self.num_steps and (jax.process_count() == 1 or step % self.log_every == 0)


class Run:
    """What the loop keeps besides the state: the checkpoint manager, the metrics log and progress bar
    (process 0), the clock (seconds since the start, images/s since the last lap), the last saved step."""

    def __init__(self, config, workdir: str, setup):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.is_main = jax.process_index() == 0
        self.manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
        self.metrics_log = self.progress = None
        self.tracing = False

    def starting_state(self):
        """The newest usable checkpoint's state (on the host); without a checkpoint, a fine-tune's
        imported weights or the fresh state with its data-dependent initialisation."""
        quarantine = os.path.join(self.workdir, "unusable_checkpoints") if self.is_main else None
        state = checkpoints.restore_latest(self.manager, self.setup.fresh_state, quarantine)
        if int(state.step):  # A resumed run continues from its own checkpoints, fine-tunes too.
            return state
        if self.config.init_from:
            return finetune.imported_state(self.config, self.setup)
        return self.setup.initialised(state)

    def begin(self, start_step: int) -> None:
        """Opens the metrics log and starts the clock; called once, right ahead of the first step."""
        config, setup = self.config, self.setup
        self.metrics_log = workdir_lib.MetricsLog(self.workdir) if self.is_main else None
        if start_step:
            logging.info("resumed from the checkpoint at step %d", start_step)
        logging.info(
            f"training {config.model.name} on {config.data.name}: {setup.num_steps} steps ({setup.steps_per_epoch}"
            f" per epoch), {jax.device_count()} devices on {jax.process_count()} processes"
        )
        if self.is_main and sys.stderr.isatty():
            import tqdm

            self.progress = tqdm.tqdm(total=setup.num_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.start_step, self.last_saved = start_step, start_step or None
        self.compile_seconds = None  # the first step's wall time (its compilation), until a record reports it
        self.started = time.perf_counter()
        self.lap(start_step, self.started)

    def lap(self, step: int, at: float = None) -> None:
        self.lap_step, self.lap_at = step, time.perf_counter() if at is None else at

    def stepped(self, step: int, state, logging_now: bool) -> None:
        """After each step: the progress bar; after the first, its wall time (mostly compilation)."""
        if self.progress:
            self.progress.update(1)
        if step == self.start_step + 1:  # The one wait outside logging: the first step is its compilation.
            jax.block_until_ready(state)
            self.compile_seconds = time.perf_counter() - self.started
            if not logging_now:  # The first record's throughput then leaves compilation out.
                self.lap(step, self.started + self.compile_seconds)

    def profile(self, step: int, state) -> None:
        """Traces `config.profile_steps` steps after the first (its compilation) into WORKDIR/profile/ (process 0)."""
        first = self.start_step + 1
        last = min(first + self.config.profile_steps, self.setup.num_steps)
        if step == first and last > first and self.is_main:
            jax.profiler.start_trace(os.path.join(self.workdir, "profile"), create_perfetto_trace=True)
            self.tracing = True
        elif step == last and self.tracing:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False
            logging.info("a trace of steps %d-%d is in %s", first + 1, last, os.path.join(self.workdir, "profile"))

    def train_metrics(self, state) -> dict:
        """The metric sums since the last record, on the host; stops on a non-finite loss."""
        sums = self.setup.layout.unreplicate(state.train_metrics)
        bad = int(sums["first_nonfinite_step"])
        if bad >= 0:
            last = self.last_saved
            where = f"the last good checkpoint is step {last}" if last else "no checkpoint was saved"
            raise RunFailure(
                f"the loss became {float(sums['loss'])} (not finite) at step {bad}; {where} in "
                f"{checkpoints.checkpoint_dir(self.workdir)}."
                f" Lower --config.learning_rate or set --config.grad_clip_norm"
            )
        return sums

    def log_train(self, step: int, state):
        """Writes the train record of the steps since the last one; returns `state` with its sums reset."""
        sums = self.train_metrics(state)
        now = time.perf_counter()
        values = {
            "loss": float(sums["loss"] / sums["count"]),
            "accuracy": float(sums["accuracy"] / sums["count"]),
            "learning_rate": float(self.setup.learning_rate_fn(step - 1)),
            "images_per_sec": (step - self.lap_step) * self.config.batch_size / (now - self.lap_at),
            "elapsed_seconds": now - self.started,
        }
        if self.compile_seconds is not None:
            values["compile_seconds"], self.compile_seconds = self.compile_seconds, None
        self.lap(step, now)
        self._write(step, "train", values)
        return state.replace(train_metrics=self.setup.layout.replicate(train.empty_train_metrics()))

    def evaluate_and_record(self, step: int, state, p_eval_step):
        """Evaluates every split and writes their records; returns the metrics the checkpoint keeps."""
        accuracy = {}
        for split, images, labels in self.setup.dataset.eval_splits():
            began = time.perf_counter()
            result = evaluate_split(self.setup, p_eval_step, state, images, labels)
            accuracy[split] = result["accuracy"]
            now = time.perf_counter()
            seconds = {"eval_seconds": now - began, "elapsed_seconds": now - self.started}
            self._write(step, split, {"loss": result["loss"], "accuracy": result["accuracy"], **seconds})
        if self.metrics_log:
            plots.plot_curves(self.workdir)
        # The kept "best" checkpoint is chosen on validation only, never on test.
        return {"validation_accuracy": accuracy["validation"]} if "validation" in accuracy else None

    def save(self, step: int, state, metrics: dict = None) -> None:
        """Starts saving `state` (never a non-finite one) as the checkpoint of `step`."""
        self.train_metrics(state)
        checkpoints.save(self.manager, self.setup.layout.unreplicate(state), metrics)
        self.last_saved = step

    def stop(self, step: int, state, signal_name: str, config_path: str) -> None:
        """Saves `state` (unless just saved) and says how to resume."""
        if self.last_saved != step:
            self.save(step, state)
        checkpoints.wait(self.manager)
        if self.is_main:
            by = signal_name or "a signal on another process"
            resume = f"python run.py --config {config_path} --workdir {self.workdir}"
            print(f"stopped by {by} at step {step}; checkpoint saved. Resume with: {resume}", flush=True)

    def close(self, failed: bool = False) -> None:
        """Releases orbax's threads, the progress bar and the metrics log; after a multi-process run's failure
        not orbax's: a pending save may wait on a lost process until jax's heartbeat timeout (run.py exits)."""
        if self.tracing:
            jax.profiler.stop_trace()
        if not (failed and jax.process_count() > 1):
            checkpoints.close(self.manager)
        if self.progress:
            self.progress.close()
        if self.metrics_log:
            self.metrics_log.close()

    def _write(self, step: int, split: str, values: dict) -> None:
        """Appends the record to the metrics log and prints it, on process 0."""
        if not self.metrics_log:
            return
        record = {"step": step, "epoch": step / self.setup.steps_per_epoch, "split": split, **values}
        self.metrics_log.write(record)
        text = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "split"
        )
        if self.progress:
            self.progress.write(f"{split}: {text}")
        else:
            print(f"{split}: {text}", flush=True)


def evaluate_split(setup, p_eval_step, state, images, labels) -> dict:
    """Loss, accuracy and confusion matrix over a whole split (each example once), with
    `setup.parallel_eval_step()` and a state that `setup.layout` replicated."""
    totals, layout, batch_size = None, setup.layout, setup.config.eval_batch_size
    for batch in pipeline.eval_batches(images, labels, batch_size=batch_size, part=layout.process_slice(batch_size)):
        sums = p_eval_step(state, layout.place_batch(batch))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = layout.unreplicate(totals)
    confusion = np.asarray(totals["confusion"], np.int64)
    count = int(confusion.sum())
    loss, accuracy = float(totals["loss"]) / count, float(np.trace(confusion)) / count
    return {"loss": loss, "accuracy": accuracy, "num_examples": count, "confusion": confusion}


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    received = None  # the signal's name

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        """Whether to stop now: a signal reached this process or, in a multi-process run, any
        process (every process must ask at the same step)."""
        return parallel.any_process(self.received is not None)
