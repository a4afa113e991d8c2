"""Checks a config before anything is compiled or loaded: one clear message per mistake."""

import re

import jax

from resnet_jax import models, optimizer, parallel, train
from resnet_jax.data import pipeline, registry
from resnet_jax.errors import Error

EXPORT_FORMATS = ("stablehlo", "savedmodel")
# Drop when a jax2onnx that installs beside orbax-checkpoint 0.12 converts on jax 0.11 and later.
ONNX_REFUSED = (
    "--config.export_formats: onnx is not available: no jax2onnx release that installs beside "
    "orbax-checkpoint 0.12 converts on jax 0.11 or later (0.13.0 fails there; 0.13.1 and later require "
    "orbax-checkpoint<0.11.37); leave onnx out, e.g. --config.export_formats=stablehlo,savedmodel"
)
DTYPES = ("float32", "bfloat16")


def _choice(name, value, choices):
    if value not in choices:
        raise Error(f"--config.{name}={value!r} is not one of: {', '.join(choices)}")


def _positive(config, *names):
    for name in names:
        value = config
        for key in name.split("."):
            value = value[key]
        if not value > 0:
            raise Error(f"--config.{name} must be positive, got {value!r}")


def validate(config, device_count: int = None) -> None:
    """Raises Error naming the first field that is wrong and how to fix it."""
    device_count = device_count or jax.device_count()
    _choice("model.name", config.model.name, sorted(models.MODELS))
    _choice("model.stem", config.model.stem, models.STEMS)
    _choice("model.dtype", config.model.dtype, DTYPES)
    if config.model.num_filters is not None:
        _positive(config, "model.num_filters")
    _choice("data.name", config.data.name, tuple(registry.DATASETS))
    if config.data.name == "folder" and not config.data.folder:
        raise Error(
            "--config.data.name=folder needs --config.data.folder=DIR (holding train/<class>/ and test/<class>/ images)"
        )
    _positive(config, "data.image_size")
    _choice("data.padding_mode", config.data.padding_mode, tuple(pipeline.PADDING_MODES))
    _choice("data.normalization", config.data.normalization, pipeline.NORMALIZATIONS)
    _choice("data.flip", config.data.flip, pipeline.FLIPS)
    if config.data.crop_padding < 0 or config.data.cutout < 0 or config.data.validation_examples < 0:
        raise Error("--config.data.crop_padding, data.cutout and data.validation_examples must be >= 0")
    _choice("parallel", config.parallel, tuple(parallel.LAYOUTS))
    _choice("schedule", config.schedule, optimizer.SCHEDULES)
    _choice("eval_tta", config.eval_tta, train.TTA_MODES)
    if not 0 <= config.ema_decay < 1:
        raise Error(
            f"--config.ema_decay must be in [0, 1) (0: off; 0.99 averages about the last 100 steps),"
            f" got {config.ema_decay}"
        )
    _positive(config, "batch_size", "eval_batch_size", "learning_rate", "base_batch_size")
    _positive(config, "log_every_steps", "checkpoint_every_steps", "eval_every_epochs", "keep_checkpoints")
    if config.num_train_steps <= 0:
        _positive(config, "num_epochs")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % device_count:
            raise Error(
                f"--config.{name}={config[name]} is not divisible by the {device_count} devices in use; "
                f"choose a multiple of {device_count}"
            )
    _validate_optimizer_options(config)
    if not 0 <= config.momentum < 1:
        raise Error(f"--config.momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.label_smoothing < 1:
        raise Error(f"--config.label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
        alphas = f"{config.mixup_alpha}, {config.cutmix_alpha}"
        raise Error(f"--config.mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {alphas}")
    if min(config.weight_decay, config.grad_clip_norm, config.warmup_epochs, config.profile_steps) < 0:
        raise Error("--config.weight_decay, grad_clip_norm, warmup_epochs and profile_steps must be >= 0")
    if not all(len(drop) == 2 and 0 < drop[0] < 1 for drop in config.lr_drops):
        raise Error(
            f"--config.lr_drops must be (fraction of training in (0, 1), factor) pairs, e.g. ((0.5, 0.1),),"
            f" got {config.lr_drops}"
        )
    for name in ("eval_checkpoint_step", "init_from_step"):
        step = str(config[name])
        if step not in ("latest", "best") and not step.isdigit():
            raise Error(f"--config.{name} must be 'latest', 'best' or a step number, got {step!r}")
    if not export_formats(config):
        raise Error(
            f"--config.export_formats={config.export_formats!r} names no format;"
            f" choose from {', '.join(EXPORT_FORMATS)}"
        )
    for name in export_formats(config):
        if name == "onnx":
            raise Error(ONNX_REFUSED)
        _choice("export_formats", name, EXPORT_FORMATS)


def _validate_optimizer_options(config) -> None:
    """The per-parameter rules, lookahead, and the widths of the fixed-width models."""
    for rule in config.param_rules:
        if not _is_param_rule(rule):
            raise Error(
                f"--config.param_rules: {rule!r} is not (name regex, lr multiplier >= 0, weight-decay multiplier"
                f' >= 0, epochs it trains: -1 all, 0 none), e.g. (("whiten/kernel", 1, 1, 0), (".*", 1, 0, -1))'
            )
    if config.lookahead_every < 0:
        raise Error(f"--config.lookahead_every must be >= 1 (0: off), got {config.lookahead_every}")
    if config.model.num_filters is not None and config.model.name in models.FIXED_WIDTH_MODELS:
        raise Error(f"--config.model.num_filters does not apply to {config.model.name}: its widths are fixed")


def _is_param_rule(rule) -> bool:
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if not (isinstance(rule, (tuple, list)) and len(rule) == 4 and isinstance(rule[0], str)):
        return False
    try:
        re.compile(rule[0])
    except re.error:
        return False
    epochs = rule[3]
    return number(rule[1]) and number(rule[2]) and (epochs is None or isinstance(epochs, int) and epochs >= -1)


def export_formats(config) -> list:
    """The formats `--config.export_formats` lists, in its order."""
    return [name.strip() for name in config.export_formats.split(",") if name.strip()]
