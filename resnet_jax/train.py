"""The pure parts of training: the state, the model, the per-device train and eval steps (collectives
over `parallel.AXIS`), and `Setup`, which builds them with the schedule and the optimizer from a config
and a data set; the device layout `config.parallel` names (`Setup.layout`) spreads them and `loop` runs them."""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from resnet_jax import models, optimizer, parallel
from resnet_jax.data import pipeline
from resnet_jax.errors import Error

WHITENING_IMAGES = 5000  # the train images a whitening conv's kernel is computed from (airbench's)
TTA_MODES = ("none", "flip", "flip_translate")
LOOKAHEAD_DECAY = 0.95  # airbench's lookahead: its average's decay per step, decay^every x (step / steps)^3 at a move


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus the BatchNorm statistics, the train metrics' sums since
    the last record (so a resumed run logs exactly what an uninterrupted one would) and the averages."""

    batch_stats: Any
    train_metrics: Any
    ema: Any = None  # {"params", "batch_stats"} averaged over steps; None: ema_decay is 0
    lookahead: Any = None  # {"params", "batch_stats"}: the average lookahead moves to; None: off


def empty_train_metrics():
    """Sums of loss and accuracy over `count` steps, and the first step whose loss was not finite."""
    return dict(loss=jnp.float32(0), accuracy=jnp.float32(0), count=jnp.int32(0), first_nonfinite_step=jnp.int32(-1))


def create_model(config, num_classes: int):
    """The configured model; BatchNorm averages over the devices' axis when sync_batch_norm."""
    overrides = {"dtype": jnp.dtype(config.model.dtype), "zero_init_residual": config.model.zero_init_residual}
    if config.model.num_filters is not None:
        overrides["num_filters"] = config.model.num_filters
    if config.model.name in models.STEM_MODELS:
        overrides["stem"] = config.model.stem
    if config.model.sync_batch_norm:
        overrides["axis_name"] = parallel.AXIS
    return models.get_model(config.model.name, num_classes=num_classes, **overrides)


def total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def eval_variables(state: TrainState) -> dict:
    """The variables evaluation, predict and export apply: the moving average when there is one."""
    return state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}


def mixes(config) -> bool:
    """Whether training mixes batches: Mixup or CutMix on."""
    return config.mixup_alpha > 0 or config.cutmix_alpha > 0


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0, partner_labels=None, lam=1.0):
    """Per-example cross-entropy against (optionally smoothed) one-hot labels; with `partner_labels` (Mixup,
    CutMix), against lam * smoothed(labels) + (1 - lam) * smoothed(partner_labels), as timm's mixup_target."""

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


def train_step(state, batch, *, preprocess_fn, aug_key, label_smoothing, ema_decay=0.0, mix_fn=None, lookahead=None):
    """One SGD step on this device's part of the global batch, with the gradient of the loss averaged
    over the global batch. Augmentation draws from `aug_key` folded with the step (none when None);
    `mix_fn` (`pipeline.mix_weights` configured) mixes each image with its partner, which the batch
    carries; `lookahead` is `lookahead_move`'s (every, decay, num_steps)."""
    key = None if aug_key is None else jax.random.fold_in(aug_key, state.step)
    images = preprocess_fn(batch["image"], key=key, positions=batch["position"], flips=batch.get("flip"))
    partner_labels, lam = None, 1.0
    if mix_fn is not None:
        partners = preprocess_fn(
            batch["partner_image"], key=key, positions=batch["partner_position"], flips=batch.get("partner_flip")
        )
        lam, weight = mix_fn(state.step, *images.shape[1:3])
        images = (weight * images + (1.0 - weight) * partners).astype(images.dtype)
        partner_labels = batch["partner_label"]

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        losses = cross_entropy(logits, batch["label"], logits.shape[-1], label_smoothing, partner_labels, lam)
        return losses.mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    # Without sync BN each device normalises by its own batch; averaging the running
    # statistics keeps the state identical on every device all the same.
    batch_stats = jax.lax.pmean(batch_stats, parallel.AXIS)
    loss, top1 = jax.lax.pmean((loss, accuracy(logits, batch["label"], partner_labels, lam)), parallel.AXIS)
    sums, first_bad = state.train_metrics, state.train_metrics["first_nonfinite_step"]
    first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), state.step + 1, first_bad)
    train_metrics = {
        "loss": sums["loss"] + loss,
        "accuracy": sums["accuracy"] + top1,
        "count": sums["count"] + 1,
        "first_nonfinite_step": first_bad.astype(jnp.int32),
    }
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats, train_metrics=train_metrics)
    if state.lookahead is not None:
        new_state = lookahead_move(new_state, *lookahead)
    if state.ema is None:
        return new_state
    # TF's ExponentialMovingAverage with num_updates: the decay ramps up as (1 + t) / (10 + t),
    # so the random initialisation is forgotten in short runs too.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    current = {"params": new_state.params, "batch_stats": new_state.batch_stats}
    return new_state.replace(ema=optax.incremental_update(current, state.ema, 1.0 - decay))


def lookahead_decay(step, every: int, decay: float, num_steps: int):
    """The average's decay at a lookahead move after `step` steps: airbench's decay^every x (step / num_steps)^3."""
    return decay**every * (step / num_steps) ** 3


def lookahead_move(state: TrainState, every: int, decay: float, num_steps: int) -> TrainState:
    """airbench's LookaheadState: after every `every`-th step the average of params and BatchNorm
    statistics moves toward them (`lookahead_decay`) and they move to it; after the last step they
    move to the average. optax.lookahead does not fit: its step size is fixed and it averages params only."""
    step = state.step
    moving = step % every == 0
    weight = 1.0 - lookahead_decay(step, every, decay, num_steps)
    current = {"params": state.params, "batch_stats": state.batch_stats}
    average = jax.tree_util.tree_map(
        lambda avg, new: jnp.where(moving, avg + weight * (new - avg), avg), state.lookahead, current
    )
    jump = moving | (step == num_steps)
    weights = jax.tree_util.tree_map(lambda avg, new: jnp.where(jump, avg, new), average, current)
    return state.replace(params=weights["params"], batch_stats=weights["batch_stats"], lookahead=average)


def tta_logits(apply_fn: Callable, images, tta: str = "none"):
    """Logits of normalised images averaged over test-time views: "flip", each image and its mirror;
    "flip_translate" (airbench's), half that and half the same over the image shifted a pixel up-left and down-right."""

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
    """Sums over the real (mask=1) examples of the global batch: the loss and the confusion matrix."""
    apply = functools.partial(state.apply_fn, eval_variables(state), train=False)
    logits = tta_logits(apply, preprocess_fn(batch["image"]), tta)
    num_classes = logits.shape[-1]
    mask = batch["mask"]
    labels = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
    confusion = jnp.einsum("bi,bj->ij", labels, jax.nn.one_hot(jnp.argmax(logits, -1), num_classes))
    loss = jnp.sum(cross_entropy(logits, batch["label"], num_classes) * mask)
    return jax.lax.psum({"loss": loss, "confusion": confusion.astype(jnp.int32)}, parallel.AXIS)


class Setup:
    """What training and every mode build from a config and a data set: the model, the schedule, the
    fresh state, the preprocessing and the steps spread over the devices."""

    def __init__(self, config, dataset):
        self.config = config
        self.dataset = dataset
        self.model = create_model(config, dataset.num_classes)
        self.steps_per_epoch = len(dataset.train_images) // config.batch_size
        self.num_steps = total_steps(config, self.steps_per_epoch)
        self.learning_rate_fn = optimizer.create_learning_rate_fn(config, self.steps_per_epoch, self.num_steps)
        self.layout = parallel.layout(config.parallel)
        init_key, self.aug_key = jax.random.split(jax.random.key(config.seed))
        shape = (1, *dataset.train_images.shape[1:])
        variables = jax.jit(lambda key: self.model.init(key, jnp.zeros(shape, self.model.dtype), train=False))(init_key)
        treatments = optimizer.param_rules(config, variables["params"])
        tx = optimizer.create_optimizer(config, self.learning_rate_fn, treatments, self.steps_per_epoch)
        state = TrainState.create(apply_fn=self.model.apply, tx=tx, train_metrics=empty_train_metrics(), **variables)
        self.fresh_state = self.with_weights(state, variables)
        mean, std = pipeline.normalization(config.data, dataset)
        self.preprocess_fn = functools.partial(
            pipeline.preprocess, mean=mean, std=std, dtype=self.model.dtype, data_config=config.data
        )
        self.mix_fn = None  # (step, height, width) -> (lam, weight), when mixing
        if mixes(config):  # from a stream of its own: mixing changes neither the init nor the augmentation draws
            key = jax.random.fold_in(jax.random.key(config.seed), 1)
            alphas = {"mixup_alpha": config.mixup_alpha, "cutmix_alpha": config.cutmix_alpha}
            self.mix_fn = functools.partial(pipeline.mix_weights, key, **alphas)

    def with_weights(self, state: TrainState, variables: dict) -> TrainState:
        """`state` with `variables`' params and BatchNorm statistics, its averages (EMA, lookahead) starting
        from them. Host copies: an average must not share buffers with the params the step donates."""
        weights = {key: variables[key] for key in ("params", "batch_stats")}
        copy = functools.partial(jax.tree_util.tree_map, np.array, weights)
        ema, lookahead = self.config.ema_decay > 0, self.config.lookahead_every > 0
        return state.replace(**weights, ema=copy() if ema else None, lookahead=copy() if lookahead else None)

    def initialised(self, state: TrainState) -> TrainState:
        """The fresh `state` with its data-dependent initialisation, done once at a run's start (a checkpoint
        keeps it): a `whiten` conv's kernel from the first WHITENING_IMAGES train images, normalised."""
        if "whiten" not in state.params:
            return state
        mean, std = pipeline.normalization(self.config.data, self.dataset)
        images = (self.dataset.train_images[:WHITENING_IMAGES].astype(np.float32) - mean) / std
        height, width, channels, outputs = state.params["whiten"]["kernel"].shape
        if 2 * height * width * channels != outputs:
            raise Error(
                f"{self.config.model.name}'s whitening conv has {outputs} outputs, an eigenvector and its negative"
                f" for each value of a {height}x{width} patch of {outputs // (2 * height * width)}-channel images,"
                f" and the images of {self.config.data.name} have {channels} channels; choose a model without"
                f" whitening (e.g. resnet20)"
            )
        kernel = models.whitening_kernel(images, height)
        params = {**state.params, "whiten": {**state.params["whiten"], "kernel": kernel}}
        return self.with_weights(state, {"params": params, "batch_stats": state.batch_stats})

    def configured_train_step(self):
        """`train_step` with this config's preprocessing, augmentation key, smoothing, averages, mix and loss."""
        config = self.config
        return functools.partial(
            train_step,
            preprocess_fn=self.preprocess_fn,
            aug_key=self.aug_key if config.data.augment else None,
            label_smoothing=config.label_smoothing,
            ema_decay=config.ema_decay,
            mix_fn=self.mix_fn,
            lookahead=(config.lookahead_every, LOOKAHEAD_DECAY, self.num_steps),
        )

    def parallel_train_step(self, devices=None):
        """The train step on every local device (or `devices`); it donates the state it is given."""
        return self.layout.map_step(self.configured_train_step(), devices, donate_state=True)

    def parallel_eval_step(self, devices=None, tta=None):
        """The eval step on every local device, with test-time augmentation `tta` (default: config.eval_tta)."""
        step = functools.partial(eval_step, preprocess_fn=self.preprocess_fn, tta=tta or self.config.eval_tta)
        return self.layout.map_step(step, devices)

    def train_batches(self, start_step: int, stop_step: int = None, devices=None):
        """This process's batches of steps [start_step, stop_step or the last), prefetched to the local `devices`."""
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
            alternating_flip=config.data.augment and config.data.flip == "alternating",
        )
        return self.layout.device_batches(batches, devices)
