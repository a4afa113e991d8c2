"""The device layout: how the per-device train and eval steps are spread over the devices.

The steps themselves (`train.train_step`, `train.eval_step`) work on one device's part of the
global batch and combine results with collectives (`pmean`, `psum`) over the axis AXIS. A
layout decides everything else, and nothing outside this module knows which one runs:

    "pmap"     `jax.pmap` over this process's devices (the default). The state is
               stacked, one copy per local device; a batch gets a leading local-device axis.
    "sharded"  one `jax.jit` of `jax.shard_map` over a one-axis mesh of every device of every
               process, as JAX recommends (pmap is in maintenance mode). The
               state is one replicated global array; a batch one global array split on AXIS,
               built across hosts with `jax.make_array_from_process_local_data`.

Both give each device the same rows of the global batch and run the same per-device code, so
they train the same (tests/test_parallel.py), and both hand back host copies that checkpoints
save: a checkpoint of either resumes under either. Every method takes `devices` (default:
what the layout spans) so that tests can compare 1 device with 8.

    layout(name)                the Pmap or Sharded layout
    .replicate(state)           the state on every device
    .process_slice(batch_size)  the rows of every global batch that this process supplies
    .device_batches(batches)    host batches (this process's rows) on the devices, PREFETCH ahead
    .place_batch(batch)         one host batch laid out for a mapped step
    .map_step(fn)               fn(state, batch) on every device's part of the batch
    .unreplicate(tree)          one copy back on the host, as numpy
    any_process(flag)           whether `flag` is set on any process
    sync(name)                  waits for every process to reach this point
"""

import collections
import functools

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the axis the steps' collectives and BatchNorm's sync name
PREFETCH = 2  # batches in flight: the host builds and sends batch N+2 while the devices compute step N


def process_slice(batch_size: int, process_index: int = None, process_count: int = None) -> slice:
    """This process's contiguous rows of every global batch (by default, of this process)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def shard(batch: dict, num_devices: int) -> dict:
    """Adds the leading local-device axis that `jax.pmap` maps over to every array of `batch`."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def sync(name: str) -> None:
    """Waits until every process has reached the point named `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process must call it at the same point."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class Pmap:
    """`jax.pmap` over this process's devices: the state stacked, one copy per local device."""

    name = "pmap"
    process_slice = staticmethod(process_slice)

    def replicate(self, tree, devices=None):
        """`tree` copied onto every local device (or `devices`), laid out as the mapped steps
        return their outputs: sharded over a mesh axis named AXIS. With flax's default axis
        name the first step's input layout differs from every later step's, and each layout
        compiles the step once more."""
        return jax_utils.replicate(tree, devices, axis_name=AXIS)

    def unreplicate(self, tree):
        """This process's first-device copy of a replicated tree, as host numpy arrays. Reads
        local data only: indexing `x[0]` would be a cross-process computation on several hosts."""
        return jax.device_get(jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree))

    def place_batch(self, batch: dict, devices=None) -> dict:
        """One host batch (this process's rows) split over the local devices; the step copies it over."""
        return shard(batch, len(devices or jax.local_devices()))

    def device_batches(self, batches, devices=None):
        """Host batches (this process's rows) already on the local devices, laid out as `replicate`
        lays out the state, PREFETCH of them in flight so that no step waits for its input."""
        devices = devices or jax.local_devices()
        batches = (shard(b, len(devices)) for b in batches)
        return jax_utils.prefetch_to_device(batches, PREFETCH, devices, axis_name=AXIS)

    def map_step(self, fn, devices=None, donate_state: bool = False):
        """`fn(state, batch)` on each local device, on its part of the batch, with collectives over
        AXIS spanning every device of every process. `donate_state`: the output state reuses the
        input's buffers (the train step: one copy of the state)."""
        return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else (), devices=devices)


def _mesh(devices=None) -> Mesh:
    """The one-axis mesh of `devices` (default: every device of every process), built once per set."""
    return _cached_mesh(tuple(devices or jax.devices()))


@functools.lru_cache(maxsize=None)
def _cached_mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


class Sharded:
    """One `jax.jit` of `jax.shard_map` over a mesh of every device of every process (or
    `devices`): the state a replicated global array, each batch a global array split on AXIS."""

    name = "sharded"
    process_slice = staticmethod(process_slice)  # jax.devices() lists each process's devices together, in order

    def replicate(self, tree, devices=None):
        """`tree` (the same on every process) as global arrays replicated over the mesh."""
        sharding = NamedSharding(_mesh(devices), PartitionSpec())

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree_util.tree_map(put, tree)

    def unreplicate(self, tree):
        """The value of replicated global arrays, as host numpy arrays, from this process's first copy."""
        return jax.device_get(jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree))

    def place_batch(self, batch: dict, devices=None) -> dict:
        """One host batch (this process's rows) as global arrays split over the mesh on AXIS."""
        sharding = NamedSharding(_mesh(devices), PartitionSpec(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def device_batches(self, batches, devices=None):
        """`place_batch` of each host batch, PREFETCH of them in flight (as flax's prefetch_to_device)."""
        queue = collections.deque()
        for batch in batches:
            queue.append(self.place_batch(batch, devices))
            if len(queue) == PREFETCH:
                yield queue.popleft()
        yield from queue

    def map_step(self, fn, devices=None, donate_state: bool = False):
        """`fn(state, batch)` on each device's block of the batch, the state replicated in and out.

        check_vma=False keeps pmap's semantics, which the steps are written for: each device's
        gradient is its own until the step's `pmean` averages it. With shard_map's default
        (True) autodiff already sums the gradient of a replicated parameter over the axis, and
        the step's `pmean` would then leave the sum, not the mean.
        """
        P = PartitionSpec
        mapped = jax.shard_map(fn, mesh=_mesh(devices), in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


LAYOUTS = {"pmap": Pmap, "sharded": Sharded}


def layout(name: str = "pmap"):
    """The device layout `config.parallel` names."""
    return LAYOUTS[name]()
