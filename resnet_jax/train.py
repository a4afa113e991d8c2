"""Training and evaluation: pure step functions, `jax.pmap`ped where the loop calls them.

    create_train_state -> (train_step)* with evaluate() every so often -> checkpoints

`train_step` and `eval_step` are per-device functions; the loop maps them over every
local device with `jax.pmap(..., axis_name="batch")`, and across hosts the same axis
spans every device of every process.
"""

import functools
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state
from jax.experimental import multihost_utils

from resnet_jax import checkpoints, finetune, input_pipeline, models, plots, workdir as workdir_lib
from resnet_jax.errors import RunFailure

AXIS = "batch"
SCHEDULES = ("cosine", "piecewise", "onecycle", "constant")
TTA_MODES = ("none", "flip", "flip_translate")


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus the explicit BatchNorm statistics, the sums
    of the train metrics since the last record (so a resumed run logs exactly what an
    uninterrupted one would) and, when `ema_decay` > 0, the moving average of params and
    BatchNorm statistics that evaluation uses."""

    batch_stats: Any
    train_metrics: Any
    ema: Any = None  # {"params", "batch_stats"} averaged over steps; None: ema_decay is 0


def empty_train_metrics():
    """Sums of loss and accuracy over `count` steps, and the first step whose loss was not finite."""
    return {"loss": jnp.float32(0), "accuracy": jnp.float32(0), "count": jnp.int32(0), "first_nonfinite_step": jnp.int32(-1)}


# ------------------------------------------------------------------------------- setup


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    """The configured model; BatchNorm averages over the pmap axis when sync_batch_norm."""
    overrides = {"dtype": jnp.dtype(config.model.dtype)}
    if config.model.num_filters is not None:
        overrides["num_filters"] = config.model.num_filters
    if config.model.name in models.STEM_MODELS:
        overrides["stem"] = config.model.stem
    if config.model.sync_batch_norm:
        overrides["axis_name"] = AXIS
    return models.get_model(
        config.model.name,
        num_classes=num_classes,
        zero_init_residual=config.model.zero_init_residual,
        **overrides,
    )


def steps_per_epoch(config, num_train_examples: int) -> int:
    return num_train_examples // config.batch_size


def total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def peak_learning_rate(config) -> float:
    """The learning rate scaled linearly with the batch size."""
    return config.learning_rate * config.batch_size / config.base_batch_size


def create_learning_rate_fn(config, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
    peak = peak_learning_rate(config)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    if config.schedule == "piecewise":
        return optax.piecewise_constant_schedule(
            peak, {int(f * num_steps): config.lr_decay_factor for f in config.lr_boundaries}
        )
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(num_steps, peak)
    if config.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def decay_mask(params):
    """True for conv and dense kernels: weight decay skips BatchNorm and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, L2 weight decay on kernels, optional clipping."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity(),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov),
    )


def create_train_state(rng, config, model, learning_rate_fn, image_shape=(32, 32, 3)) -> TrainState:
    """A fresh state on the host, initialised from `rng`."""

    @jax.jit
    def init(rng):
        return model.init(rng, jnp.zeros((1,) + tuple(image_shape), model.dtype), train=False)

    variables = init(rng)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config, learning_rate_fn),
        batch_stats=variables["batch_stats"],
        train_metrics=empty_train_metrics(),
        # Host copies: the average must not share buffers with the params the step donates.
        ema=jax.tree_util.tree_map(np.array, dict(variables)) if config.ema_decay > 0 else None,
    )


def eval_variables(state: TrainState) -> dict:
    """The variables evaluation, predict and export apply: the moving average when there is one."""
    return state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}


# -------------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example cross-entropy against (optionally smoothed) one-hot labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch, *, preprocess_fn: Callable, aug_key, label_smoothing, ema_decay=0.0):
    """One SGD step on this device's part of the global batch; gradients are averaged over AXIS.

    Augmentation draws from `aug_key` folded with the step (none when `aug_key` is None).
    """
    key = None if aug_key is None else jax.random.fold_in(aug_key, state.step)
    images = preprocess_fn(batch["image"], key=key, positions=batch["position"])

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        loss = cross_entropy(logits, batch["label"], logits.shape[-1], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    # Without sync BN each device normalises by its own batch; averaging the running
    # statistics keeps the state identical on every device all the same.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    loss, accuracy = jax.lax.pmean((loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])), AXIS)
    sums = state.train_metrics
    first_bad = jnp.where((sums["first_nonfinite_step"] < 0) & ~jnp.isfinite(loss), state.step + 1, sums["first_nonfinite_step"])
    train_metrics = {
        "loss": sums["loss"] + loss,
        "accuracy": sums["accuracy"] + accuracy,
        "count": sums["count"] + 1,
        "first_nonfinite_step": first_bad.astype(jnp.int32),
    }
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats, train_metrics=train_metrics)
    if state.ema is None:
        return new_state
    # TF's ExponentialMovingAverage with num_updates: the decay ramps up as (1 + t) / (10 + t),
    # so the random initialisation is forgotten in short runs too.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    current = {"params": new_state.params, "batch_stats": new_state.batch_stats}
    return new_state.replace(ema=optax.incremental_update(current, state.ema, 1.0 - decay))


def tta_logits(apply_fn: Callable, images, tta: str = "none"):
    """Logits of normalised images, averaged over test-time views. "flip" averages each image
    and its mirror; "flip_translate" is airbench's scheme: half that, and half the same over
    the image shifted one pixel up-left and one down-right (reflect padding)."""
    def mirrored(x):
        return apply_fn(x) if tta == "none" else 0.5 * (apply_fn(x) + apply_fn(x[:, :, ::-1]))

    logits = mirrored(images)
    if tta == "flip_translate":
        height, width = images.shape[1:3]
        padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        shifted = 0.5 * (mirrored(padded[:, :height, :width]) + mirrored(padded[:, 2:, 2:]))
        logits = 0.5 * (logits + shifted)
    return logits


def eval_step(state: TrainState, batch, *, preprocess_fn: Callable, tta: str = "none"):
    """Sums over the real (mask=1) examples of the global batch: loss, correct, count, confusion."""
    apply = functools.partial(state.apply_fn, eval_variables(state), train=False)
    logits = tta_logits(apply, preprocess_fn(batch["image"]), tta)
    num_classes = logits.shape[-1]
    mask = batch["mask"]
    predictions = jnp.argmax(logits, -1)
    confusion = jnp.einsum(
        "bi,bj->ij", jax.nn.one_hot(batch["label"], num_classes) * mask[:, None], jax.nn.one_hot(predictions, num_classes)
    )
    sums = {
        "loss": jnp.sum(cross_entropy(logits, batch["label"], num_classes) * mask),
        "confusion": confusion.astype(jnp.int32),
    }
    return jax.lax.psum(sums, AXIS)


# --------------------------------------------------------------------------------- loop


def evaluate(p_eval_step, state, images, labels, config) -> dict:
    """Loss, accuracy and confusion matrix over a whole split (each example once)."""
    totals = None
    for batch in input_pipeline.eval_batches(
        images,
        labels,
        batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_devices=jax.local_device_count(),
    ):
        sums = p_eval_step(state, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = checkpoints.first_replica(totals)
    confusion = np.asarray(totals["confusion"], np.int64)
    count = int(confusion.sum())
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": float(np.trace(confusion)) / count,
        "num_examples": count,
        "confusion": confusion,
    }


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def should_stop(self, sync: bool) -> bool:
        """Whether to stop now; with `sync`, every process agrees (stops if any got a signal)."""
        if jax.process_count() == 1:
            return self.received is not None
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        return bool(np.any(flags))


class Setup:
    """Everything both modes need: data, model, schedule and the pmapped steps."""

    def __init__(self, config, dataset):
        self.config = config
        self.dataset = dataset
        self.model = create_model(config, dataset.num_classes)
        self.steps_per_epoch = steps_per_epoch(config, len(dataset.train_images))
        self.num_steps = total_steps(config, self.steps_per_epoch)
        self.learning_rate_fn = create_learning_rate_fn(config, self.steps_per_epoch, self.num_steps)
        init_key, self.aug_key = jax.random.split(jax.random.key(config.seed))
        self.initial_state = create_train_state(
            init_key, config, self.model, self.learning_rate_fn, dataset.train_images.shape[1:]
        )
        mean, std = input_pipeline.normalization(config.data, dataset)
        self.preprocess_fn = functools.partial(
            input_pipeline.preprocess, mean=mean, std=std, dtype=self.model.dtype, data_config=config.data
        )

    def train_step(self):
        """The per-device train step, configured."""
        return functools.partial(
            train_step,
            preprocess_fn=self.preprocess_fn,
            aug_key=self.aug_key if self.config.data.augment else None,
            label_smoothing=self.config.label_smoothing,
            ema_decay=self.config.ema_decay,
        )

    def p_train_step(self, devices=None):
        return jax.pmap(self.train_step(), axis_name=AXIS, donate_argnums=(0,), devices=devices)

    def p_eval_step(self, devices=None, tta=None):
        """The pmapped eval step, with test-time augmentation `tta` (default: config.eval_tta)."""
        step = functools.partial(eval_step, preprocess_fn=self.preprocess_fn, tta=tta or self.config.eval_tta)
        return jax.pmap(step, axis_name=AXIS, devices=devices)


def replicate(tree, devices=None):
    """`tree` copied onto every local device (or `devices`), laid out as the pmapped steps
    return their outputs: sharded over a mesh axis named AXIS. With flax's default axis
    name the first step's input layout differs from every later step's, and each layout
    compiles the step once more."""
    return jax_utils.replicate(tree, devices, axis_name=AXIS)


def device_batches(dataset, config, start_step: int, num_steps: int, devices=None):
    """This process's train batches of steps `start_step`..`num_steps - 1`, already on its local
    devices (or `devices`) and laid out as `replicate` lays out the state. Two are kept in
    flight: the host builds and sends batch N+2 while the devices compute step N, so no step
    waits for its input."""
    devices = devices or jax.local_devices()
    batches = (
        input_pipeline.train_batch(
            dataset.train_images, dataset.train_labels, step,
            batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), num_devices=len(devices),
        )
        for step in range(start_step, num_steps)
    )
    return jax_utils.prefetch_to_device(batches, 2, devices, axis_name=AXIS)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset=None, config_path: str = "CONFIG") -> bool:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluates, checkpoints.

    Returns whether training reached its last step (False: a signal stopped it).
    """
    is_main = jax.process_index() == 0
    dataset = dataset or input_pipeline.load_dataset(config.data)
    setup = Setup(config, dataset)
    manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
    quarantine = os.path.join(workdir, "unusable_checkpoints") if is_main else None
    state = checkpoints.restore_latest(manager, setup.initial_state, quarantine)
    start_step = int(state.step)
    if not start_step and config.init_from:  # A resumed fine-tune continues from its own checkpoints.
        state = finetune.initial_state(config, setup)
    num_steps = setup.num_steps
    spe = setup.steps_per_epoch
    log = workdir_lib.MetricsLog(workdir) if is_main else None
    eval_every = max(1, int(round(config.eval_every_epochs * spe)))
    if start_step:
        logging.info("resumed from the checkpoint at step %d", start_step)
    logging.info(
        "training %s on %s: %d steps (%d per epoch), %d devices on %d processes",
        config.model.name, config.data.name, num_steps, spe, jax.device_count(), jax.process_count(),
    )

    p_train_step = setup.p_train_step()
    p_eval_step = setup.p_eval_step()
    state = replicate(state)
    batches = device_batches(dataset, config, start_step, num_steps)
    progress = _progress_bar(is_main, start_step, num_steps)
    last_saved = start_step if start_step else None
    started = time.perf_counter()
    timer = (started, start_step)
    compile_seconds = None  # the first step's wall time (its compilation), until a record reports it

    def fetch_train_metrics():
        """The metric sums since the last record, on the host; stops on a non-finite loss."""
        sums = checkpoints.first_replica(state.train_metrics)
        bad = int(sums["first_nonfinite_step"])
        if bad >= 0:
            where = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
            raise RunFailure(
                f"the loss became {float(sums['loss'])} (not finite) at step {bad}; {where} in "
                f"{checkpoints.checkpoint_dir(workdir)}. Lower --config.learning_rate or set --config.grad_clip_norm"
            )
        return sums

    def save(step, metrics=None):
        nonlocal last_saved
        fetch_train_metrics()  # Never save a non-finite state.
        checkpoints.save(manager, checkpoints.first_replica(state), metrics)
        last_saved = step

    try:
        with _StopSignal() as stop:
            step = start_step
            while step < num_steps:
                state = p_train_step(state, next(batches))
                step += 1
                if progress:
                    progress.update(1)
                log_now = step % config.log_every_steps == 0 or step == num_steps
                if step == start_step + 1:  # The one wait outside logging: the first step is its compilation.
                    jax.block_until_ready(state)
                    compile_seconds = time.perf_counter() - started
                    if not log_now:  # Throughput is then measured after compilation.
                        timer = (started + compile_seconds, step)

                if log_now:
                    sums = fetch_train_metrics()
                    now = time.perf_counter()
                    record = {
                        "step": step, "epoch": step / spe, "split": "train",
                        "loss": float(sums["loss"] / sums["count"]), "accuracy": float(sums["accuracy"] / sums["count"]),
                        "learning_rate": float(setup.learning_rate_fn(step - 1)),
                        "images_per_sec": (step - timer[1]) * config.batch_size / (now - timer[0]),
                        "elapsed_seconds": now - started,
                    }
                    if compile_seconds is not None:
                        record["compile_seconds"], compile_seconds = compile_seconds, None
                    timer = (now, step)
                    state = state.replace(train_metrics=replicate(empty_train_metrics()))
                    if log:
                        log.write(record)
                        _report(progress, record)

                if step % eval_every == 0 or step == num_steps:
                    accuracy = {}
                    for split, images, labels in dataset.eval_splits():
                        eval_started = time.perf_counter()
                        result = evaluate(p_eval_step, state, images, labels, config)
                        accuracy[split] = result["accuracy"]
                        now = time.perf_counter()
                        record = {
                            "step": step, "epoch": step / spe, "split": split, "loss": result["loss"],
                            "accuracy": result["accuracy"], "eval_seconds": now - eval_started, "elapsed_seconds": now - started,
                        }
                        if log:
                            log.write(record)
                            _report(progress, record)
                    if log:
                        plots.plot_curves(workdir)
                    # The kept "best" checkpoint is chosen on validation only, never on test.
                    save(step, {"validation_accuracy": accuracy["validation"]} if "validation" in accuracy else None)
                    timer = (time.perf_counter(), step)
                elif step % config.checkpoint_every_steps == 0:
                    save(step)

                if stop.should_stop(sync=step % config.log_every_steps == 0) and step < num_steps:
                    if last_saved != step:
                        save(step)
                    checkpoints.wait(manager)
                    if is_main:
                        print(
                            f"stopped by {stop.received or 'a signal on another process'} at step {step}; checkpoint saved. "
                            f"Resume with: python run.py --config {config_path} --workdir {workdir}",
                            flush=True,
                        )
                    break

        checkpoints.wait(manager)
    finally:
        checkpoints.close(manager)
        if progress:
            progress.close()
        if log:
            log.close()
    return step >= num_steps


def _progress_bar(is_main: bool, start: int, total: int):
    """A tqdm bar on process 0 when stderr is a terminal; None otherwise."""
    if not (is_main and sys.stderr.isatty()):
        return None
    import tqdm

    return tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _report(progress, record: dict) -> None:
    text = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "split"
    )
    line = f"{record['split']}: {text}"
    if progress:
        progress.write(line)
    else:
        print(line, flush=True)
