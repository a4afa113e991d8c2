"""The pure parts of training: the state, the model, the optimizer and its schedules, and the
per-device train and eval steps; `Setup` builds them all from a config and a data set.

    create_train_state -> (train_step)* with eval_step over each split -> checkpoints

`train_step` and `eval_step` work on one device's part of the global batch and combine
their results with collectives over `parallel.AXIS`; the device layout `config.parallel`
names (`Setup.layout`) spreads them over every device of every process, and `loop` runs them.
"""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from resnet_jax import models, parallel
from resnet_jax.data import pipeline

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
    return {
        "loss": jnp.float32(0),
        "accuracy": jnp.float32(0),
        "count": jnp.int32(0),
        "first_nonfinite_step": jnp.int32(-1),
    }


# ------------------------------------------------------------------ model, optimizer, state


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    """The configured model; BatchNorm averages over the devices' axis when sync_batch_norm."""
    overrides = {"dtype": jnp.dtype(config.model.dtype)}
    if config.model.num_filters is not None:
        overrides["num_filters"] = config.model.num_filters
    if config.model.name in models.STEM_MODELS:
        overrides["stem"] = config.model.stem
    if config.model.sync_batch_norm:
        overrides["axis_name"] = parallel.AXIS
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


def mixes(config) -> bool:
    """Whether training mixes batches: Mixup or CutMix on, and some batches mixed."""
    return (config.mixup_alpha > 0 or config.cutmix_alpha > 0) and config.mix_prob > 0


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0, partner_labels=None, lam=1.0):
    """Per-example cross-entropy against (optionally smoothed) one-hot labels. With `partner_labels`
    (Mixup, CutMix), against lam * smoothed(labels) + (1 - lam) * smoothed(partner_labels): each
    one-hot smoothed, then the two mixed, as timm's mixup_target."""

    def smoothed(y):
        return optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)

    targets = smoothed(labels)
    if partner_labels is not None:
        targets = lam * targets + (1.0 - lam) * smoothed(partner_labels)
    return optax.softmax_cross_entropy(logits, targets)


def accuracy(logits, labels, partner_labels=None, lam=1.0):
    """Top-1 accuracy against the dominant label: each example's own (weight lam >= 0.5), else its partner's."""
    if partner_labels is not None:
        labels = jnp.where(lam >= 0.5, labels, partner_labels)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def train_step(
    state: TrainState, batch, *, preprocess_fn: Callable, aug_key, label_smoothing, ema_decay=0.0, mix_fn=None
):
    """One SGD step on this device's part of the global batch; gradients are averaged over parallel.AXIS.

    Augmentation draws from `aug_key` folded with the step (none when `aug_key` is None). With
    `mix_fn` (`pipeline.mix_weights` configured), each image is mixed with its partner's, which the
    batch carries and which is augmented by its own position, by the step's one draw.
    """
    key = None if aug_key is None else jax.random.fold_in(aug_key, state.step)
    images = preprocess_fn(batch["image"], key=key, positions=batch["position"])
    partner_labels, lam = None, 1.0
    if mix_fn is not None:
        partners = preprocess_fn(batch["partner_image"], key=key, positions=batch["partner_position"])
        lam, weight = mix_fn(state.step, *images.shape[1:3])
        images = (weight * images + (1.0 - weight) * partners).astype(images.dtype)
        partner_labels = batch["partner_label"]

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        loss = cross_entropy(logits, batch["label"], logits.shape[-1], label_smoothing, partner_labels, lam).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    # Without sync BN each device normalises by its own batch; averaging the running
    # statistics keeps the state identical on every device all the same.
    batch_stats = jax.lax.pmean(batch_stats, parallel.AXIS)
    loss, top1 = jax.lax.pmean((loss, accuracy(logits, batch["label"], partner_labels, lam)), parallel.AXIS)
    sums = state.train_metrics
    first_bad = jnp.where(
        (sums["first_nonfinite_step"] < 0) & ~jnp.isfinite(loss), state.step + 1, sums["first_nonfinite_step"]
    )
    train_metrics = {
        "loss": sums["loss"] + loss,
        "accuracy": sums["accuracy"] + top1,
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
        "bi,bj->ij",
        jax.nn.one_hot(batch["label"], num_classes) * mask[:, None],
        jax.nn.one_hot(predictions, num_classes),
    )
    sums = {
        "loss": jnp.sum(cross_entropy(logits, batch["label"], num_classes) * mask),
        "confusion": confusion.astype(jnp.int32),
    }
    return jax.lax.psum(sums, parallel.AXIS)


# -------------------------------------------------------------------------------- setup


class Setup:
    """What training and every mode build from a config and a data set: the model, the
    schedule, the fresh state, the preprocessing and the steps spread over the devices."""

    def __init__(self, config, dataset):
        self.config = config
        self.dataset = dataset
        self.model = create_model(config, dataset.num_classes)
        self.steps_per_epoch = steps_per_epoch(config, len(dataset.train_images))
        self.num_steps = total_steps(config, self.steps_per_epoch)
        self.learning_rate_fn = create_learning_rate_fn(config, self.steps_per_epoch, self.num_steps)
        self.layout = parallel.layout(config.parallel)
        init_key, self.aug_key = jax.random.split(jax.random.key(config.seed))
        self.fresh_state = create_train_state(
            init_key, config, self.model, self.learning_rate_fn, dataset.train_images.shape[1:]
        )
        mean, std = pipeline.normalization(config.data, dataset)
        self.preprocess_fn = functools.partial(
            pipeline.preprocess, mean=mean, std=std, dtype=self.model.dtype, data_config=config.data
        )
        # Mixup/CutMix draws from a stream of its own, so mixing changes neither the init nor the augmentation draws.
        self.mix_fn = None  # (step, height, width) -> (lam, weight), when mixing
        if mixes(config):
            self.mix_fn = functools.partial(
                pipeline.mix_weights,
                jax.random.fold_in(jax.random.key(config.seed), 1),
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                mix_prob=config.mix_prob,
            )

    def configured_train_step(self):
        """`train_step` with this config's preprocessing, augmentation key, smoothing, average and mix."""
        return functools.partial(
            train_step,
            preprocess_fn=self.preprocess_fn,
            aug_key=self.aug_key if self.config.data.augment else None,
            label_smoothing=self.config.label_smoothing,
            ema_decay=self.config.ema_decay,
            mix_fn=self.mix_fn,
        )

    def parallel_train_step(self, devices=None):
        """The train step on every local device (or `devices`); it donates the state it is given."""
        return self.layout.map_step(self.configured_train_step(), devices, donate_state=True)

    def parallel_eval_step(self, devices=None, tta=None):
        """The eval step on every local device, with test-time augmentation `tta` (default: config.eval_tta)."""
        step = functools.partial(eval_step, preprocess_fn=self.preprocess_fn, tta=tta or self.config.eval_tta)
        return self.layout.map_step(step, devices)

    def train_batches(self, start_step: int, stop_step: int = None, devices=None):
        """This process's train batches of steps `start_step`..`stop_step - 1` (default: to the
        last step) on the local devices (or `devices`), prefetched."""
        config = self.config
        steps = range(start_step, self.num_steps if stop_step is None else stop_step)
        batches = pipeline.train_batches(
            self.dataset.train_images,
            self.dataset.train_labels,
            steps,
            batch_size=config.batch_size,
            seed=config.seed,
            part=self.layout.process_slice(config.batch_size),
            mix=mixes(config),
        )
        return self.layout.device_batches(batches, devices)
