"""The learning-rate schedules and the optimizer: SGD with each parameter's `config.param_rules` treatment."""

import re

import jax
import optax

from resnet_jax.errors import Error

SCHEDULES = ("cosine", "piecewise", "onecycle", "constant", "airbench")


def peak_learning_rate(config) -> float:
    """The peak learning rate of the SGD step on the mean loss: `learning_rate` scaled linearly with the batch size."""
    return config.learning_rate * config.batch_size / config.base_batch_size


def create_learning_rate_fn(config, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
    peak = peak_learning_rate(config)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    if config.schedule == "piecewise":
        return optax.piecewise_constant_schedule(peak, {int(at * num_steps): factor for at, factor in config.lr_drops})
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(num_steps, peak)
    if config.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if config.schedule == "airbench":  # its get_lr: 0.2 -> 1 of the peak over int(0.23 x steps), then -> 0.07
        rise = int(0.23 * num_steps)
        return optax.join_schedules(
            [optax.linear_schedule(0.2 * peak, peak, rise), optax.linear_schedule(peak, 0.07 * peak, num_steps - rise)],
            [rise],
        )
    raise ValueError(f"unknown schedule {config.schedule!r}")


def param_name(path) -> str:
    """A parameter's name as `--mode summary` and `config.param_rules` write it: "group1_conv1/kernel"."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def param_rules(config, params) -> dict:
    """Each parameter's (learning-rate multiplier, weight-decay multiplier, epochs it trains; None: all) by
    the first rule of `config.param_rules` matching its whole name; an Error if a rule or a parameter is unmatched."""
    names = [param_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    rules = config.param_rules
    first = {name: next((i for i, rule in enumerate(rules) if re.fullmatch(rule[0], name)), None) for name in names}
    unmatched = [name for name, i in first.items() if i is None]
    if unmatched:
        catch_all = '(".*", 1.0, 0.0, -1)'
        raise Error(
            f"--config.param_rules: no rule matches {unmatched[0]!r}; end the rules with a catch-all, {catch_all}"
        )
    for i, rule in enumerate(rules):
        if i not in first.values():
            raise Error(
                f"--config.param_rules: {rule[0]!r} matches no parameter of {config.model.name} (that an earlier rule"
                f" does not); its parameters are {', '.join(sorted(names)[:4])}, ... (--mode summary lists them)"
            )

    def treatment(path, _):
        _, lr_mult, wd_mult, epochs = rules[first[param_name(path)]]
        return (float(lr_mult), float(wd_mult), None if epochs is None or epochs < 0 else int(epochs))

    return jax.tree_util.tree_map_with_path(treatment, params)


def create_optimizer(config, learning_rate_fn, treatments, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, an L2 term added to the gradient and optional clipping; one
    `optax.partition` group per `param_rules` treatment (learning rate and L2 scaled, frozen after its epochs)."""
    clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity()

    def group(lr_mult, wd_mult, epochs):
        if epochs == 0:
            return optax.set_to_zero()
        decay = config.weight_decay * wd_mult
        learning_rate = learning_rate_fn if lr_mult == 1 else lambda step: lr_mult * learning_rate_fn(step)
        l2 = optax.add_decayed_weights(decay) if decay else optax.identity()
        l2_then_sgd = optax.chain(l2, optax.sgd(learning_rate, config.momentum, config.nesterov))
        if epochs is None:
            return l2_then_sgd
        # conditionally_mask, not conditionally_transform: once the condition fails, the latter passes
        # the raw gradient through as the update; this zeroes it and keeps the momentum as it was.
        return optax.conditionally_mask(l2_then_sgd, lambda step: step < epochs * steps_per_epoch)

    is_treatment = lambda x: isinstance(x, tuple)  # noqa: E731
    distinct = sorted(set(jax.tree_util.tree_leaves(treatments, is_leaf=is_treatment)), key=str)
    labels = jax.tree_util.tree_map(str, treatments, is_leaf=is_treatment)
    return optax.chain(clip, optax.partition({str(t): group(*t) for t in distinct}, labels))
