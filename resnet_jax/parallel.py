"""The device layouts that spread the per-device steps (collectives over AXIS) over the devices: `Pmap`
and `Sharded` train the same, and a checkpoint of either resumes under either (docs/training.md).
Every method takes `devices` (default: what the layout spans) so that tests can compare 1 device with 8."""

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
        """`tree` copied onto every local device, sharded over a mesh axis named AXIS as the mapped steps
        return it: with flax's default axis name the first step would compile once more."""
        return jax_utils.replicate(tree, devices, axis_name=AXIS)

    def unreplicate(self, tree):
        """This process's first-device copy of a replicated tree as numpy (`x[0]` would run across hosts)."""
        return jax.device_get(jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree))

    def place_batch(self, batch: dict, devices=None) -> dict:
        """One host batch (this process's rows) split over the local devices; the step copies it over."""
        return shard(batch, len(devices or jax.local_devices()))

    def device_batches(self, batches, devices=None):
        """Host batches (this process's rows) on the local devices as `replicate` lays out the state, PREFETCH ahead."""
        devices = devices or jax.local_devices()
        batches = (shard(b, len(devices)) for b in batches)
        return jax_utils.prefetch_to_device(batches, PREFETCH, devices, axis_name=AXIS)

    def map_step(self, fn, devices=None, donate_state: bool = False):
        """`fn(state, batch)` on each local device's part of the batch, with collectives over AXIS spanning
        every process; with `donate_state` the output state reuses the input's buffers."""
        return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else (), devices=devices)


def _mesh(devices=None) -> Mesh:
    """The one-axis mesh of `devices` (default: every device of every process), built once per set."""
    return _cached_mesh(tuple(devices or jax.devices()))


@functools.lru_cache(maxsize=None)
def _cached_mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


class Sharded:
    """One `jax.jit` of `jax.shard_map` over a mesh of every device of every process (or `devices`): the
    state a replicated global array, each batch a global array split on AXIS."""

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
        check_vma=False keeps pmap's semantics, which the steps are written for: with shard_map's default
        autodiff already sums a replicated parameter's gradient over the axis, and `pmean` would keep the sum."""
        P = PartitionSpec
        mapped = jax.shard_map(fn, mesh=_mesh(devices), in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


LAYOUTS = {"pmap": Pmap, "sharded": Sharded}


def layout(name: str = "pmap"):
    """The device layout `config.parallel` names."""
    return LAYOUTS[name]()
