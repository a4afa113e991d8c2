"""`init_from`: a fine-tuning run's first state, from another run's checkpoint or a torchvision-style
ResNet state_dict, never unpickling an object; the head starts afresh for another number of classes
(docs/training.md#fine-tuning)."""

import logging
import os
from typing import Tuple

import numpy as np
from flax import traverse_util

from resnet_jax import checkpoints, convert, models
from resnet_jax.errors import Error, first_line

HEAD = ("params", "head")
COLLECTIONS = ("params", "batch_stats")


def read_state_dict(path: str) -> dict:
    """A PyTorch state_dict file as {name: numpy array}, without unpickling any object."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header.
            raise Error(f"cannot read the safetensors file {path}: {first_line(e)}") from None
    try:
        import torch
    except ImportError:
        raise Error(
            f"reading the PyTorch file {path} needs torch (pip install torch); or save the state_dict "
            f"with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') and use that file"
        ) from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # An UnpicklingError for objects weights_only refuses, or a corrupt file.
        raise Error(
            f"cannot read {path} as a state_dict of tensors with torch.load(weights_only=True): {first_line(e)}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise Error(
            f"{path} holds a {type(state_dict).__name__}, not a state_dict (a dict of parameter name -> tensor)"
        )
    return {k: convert.to_numpy(v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}


def read_source(config, model) -> Tuple[str, dict]:
    """(a description, {"params", "batch_stats"}) of what `config.init_from` names."""
    source = config.init_from
    if os.path.isdir(source):
        if not os.path.isdir(checkpoints.checkpoint_dir(source)):
            raise Error(f"--config.init_from={source} holds no checkpoints/; give a trained run's workdir")
        step, variables = checkpoints.restore_variables(source, str(config.init_from_step))
        return f"the checkpoint at step {step} of {source}", variables
    if not os.path.isfile(source):
        raise Error(f"--config.init_from={source!r} does not exist; give a run's workdir or a state_dict file")
    if not isinstance(model, models.ResNet):
        raise Error(
            f"--config.init_from={source}: a torchvision-style state_dict fits the ResNets, not "
            f"{config.model.name}; give a {config.model.name} run's workdir instead"
        )
    state_dict = read_state_dict(source)
    block = "bottleneck" if model.block_cls.expansion == 4 else "basic"
    try:
        variables = convert.torch_to_flax(state_dict, model.stage_sizes, block)
    except convert.Mismatch as e:
        first = f"{e.missing[0]} is missing there" if e.missing else f"{e.unmapped[0]} there has no place here"
        raise Error(_mismatch(config, source, first)) from None
    return f"the state_dict {source}", variables


def _mismatch(config, source: str, detail: str) -> str:
    width = f", num_filters={config.model.num_filters}" if config.model.num_filters else ""
    return (
        f"--config.init_from={source} does not fit {config.model.name}{width}: {detail}; "
        f"fine-tuning needs the same architecture (only the number of classes may differ)"
    )


def merge(config, source: str, template: dict, loaded: dict) -> Tuple[dict, bool]:
    """`template`'s variables with `loaded`'s values wherever they fit; returns them and whether
    the head was re-initialised (kept from `template`) because the number of classes differs."""
    ours = traverse_util.flatten_dict({c: template[c] for c in COLLECTIONS})
    theirs = traverse_util.flatten_dict({c: loaded[c] for c in COLLECTIONS})
    # The number of classes is the head kernel's last dimension (ResNet-9's head has no bias).
    new_head = theirs.get(HEAD + ("kernel",), np.zeros(0)).shape[-1] != ours[HEAD + ("kernel",)].shape[-1]
    merged = {}
    for key, value in ours.items():  # In sorted order (jax's for dicts): the first misfit is named.
        name = "/".join(key)
        if new_head and key[:2] == HEAD:
            merged[key] = value
        elif key not in theirs:
            raise Error(_mismatch(config, source, f"{name} is missing there"))
        elif theirs[key].shape != value.shape:
            raise Error(_mismatch(config, source, f"{name} has shape {theirs[key].shape} there, {value.shape} here"))
        else:
            merged[key] = np.asarray(theirs[key], value.dtype)
    extra = [key for key in theirs if key not in ours]
    if extra:
        raise Error(_mismatch(config, source, f"{'/'.join(extra[0])} there has no place here"))
    return traverse_util.unflatten_dict(merged), new_head


def imported_state(config, setup):
    """`setup.fresh_state` (fresh optimizer, step 0) with the weights `config.init_from` names."""
    description, loaded = read_source(config, setup.model)
    state = setup.fresh_state
    variables, new_head = merge(
        config, config.init_from, {"params": state.params, "batch_stats": state.batch_stats}, loaded
    )
    count = len(traverse_util.flatten_dict(variables)) - (len(variables["params"]["head"]) if new_head else 0)
    head = f"; the head is new ({setup.dataset.num_classes} classes)" if new_head else ""
    logging.info("fine-tuning from %s: loaded %d tensors%s", description, count, head)
    return setup.with_weights(state, variables)
