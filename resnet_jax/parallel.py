"""The device layout: everything that knows the train and eval steps run under `jax.pmap`.

The steps themselves (`train.train_step`, `train.eval_step`) are per-device functions whose
collectives (`pmean`, `psum`) name the axis AXIS; this module decides how they are spread
over the devices, and nothing else in the package does:

    replicate(state)            the state, one copy per local device
    process_slice(batch_size)   the rows of every global batch that this process supplies
    device_batches(batches)     host batches (this process's rows) on the devices, two ahead
    place_batch(batch)          one host batch laid out for a mapped step
    map_step(fn)                fn(state, batch) on every device's part of the batch
    unreplicate(tree)           the first local copy back on the host, as numpy
    any_process(flag)           whether `flag` is set on any process

A jit-over-a-mesh layout is another implementation of these few functions.
"""

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils

AXIS = "batch"  # the axis the steps' collectives and BatchNorm's sync name
PREFETCH = 2  # batches in flight: the host builds and sends batch N+2 while the devices compute step N


def replicate(tree, devices=None):
    """`tree` copied onto every local device (or `devices`), laid out as the mapped steps
    return their outputs: sharded over a mesh axis named AXIS. With flax's default axis
    name the first step's input layout differs from every later step's, and each layout
    compiles the step once more."""
    return jax_utils.replicate(tree, devices, axis_name=AXIS)


def unreplicate(tree):
    """This process's first-device copy of a replicated tree, as host numpy arrays.

    Reads local data only: indexing `x[0]` would be a cross-process computation in a
    multi-host run.
    """
    return jax.device_get(jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree))


def process_slice(batch_size: int, process_index: int = None, process_count: int = None) -> slice:
    """This process's contiguous rows of every global batch (by default, of this process)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def shard(batch: dict, num_devices: int) -> dict:
    """Adds the leading local-device axis that `jax.pmap` maps over to every array of `batch`."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def place_batch(batch: dict, devices=None) -> dict:
    """One host batch (this process's rows) laid out for a mapped step on the local devices
    (or `devices`); the step copies it over."""
    return shard(batch, len(devices or jax.local_devices()))


def device_batches(batches, devices=None):
    """Host batches (this process's rows) already on the local devices (or `devices`), laid out
    as `replicate` lays out the state, PREFETCH of them in flight so that no step waits for its input."""
    devices = devices or jax.local_devices()
    return jax_utils.prefetch_to_device((shard(b, len(devices)) for b in batches), PREFETCH, devices, axis_name=AXIS)


def map_step(fn, devices=None, donate_state: bool = False):
    """`fn(state, batch)` on each local device (or `devices`), on its part of the batch, with
    collectives over AXIS spanning every device of every process. With `donate_state` the
    input state's buffers are reused for the output (the train step: one copy of the state)."""
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else (), devices=devices)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process must call it at the same point."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
