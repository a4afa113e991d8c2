"""Joining a multi-process run, through the multi-host flags or the cluster jax detects (SLURM, Open MPI,
Kubernetes Indexed Jobs, Cloud TPU pods: docs/clusters.md); a one-process job stays a one-process run.
`lost_process` turns a computation that failed across processes into one line."""

import logging
import os
from typing import Optional

from resnet_jax.errors import Error, RunFailure, first_line

# jax's ClusterEnv classes by their class name, as the start-up line names them (others by that name).
NAMES = {
    "SlurmCluster": "SLURM",
    "OmpiCluster": "Open MPI",
    "K8sCluster": "Kubernetes",
    "GkeTpuCluster": "Cloud TPU (GKE)",
    "GceTpuCluster": "Cloud TPU",
}


def jax_internals():
    """jax's cluster environments, in the order jax.distributed.initialize() tries them, and its
    distributed state: no public API exposes them, so this is the project's one read of jax's
    private modules (tests/test_cluster.py names a release that moves them)."""
    from jax._src import clusters, distributed

    return clusters.ClusterEnv._cluster_types, distributed.global_state


def detect() -> Optional[str]:
    """The cluster jax.distributed.initialize() would join through, or None: none, or a one-process job
    (joining would start a coordinator for nothing and, on SLURM and Open MPI, hide all GPUs but one)."""
    cluster_types, _ = jax_internals()
    for env in cluster_types:
        if env.opt_in_only_method:  # mpi4py: only when asked for by name
            continue
        # Every pod sees KUBERNETES_SERVICE_HOST; only an Indexed Job's pods have an index to join with.
        if env.__name__ == "K8sCluster" and "JOB_COMPLETION_INDEX" not in os.environ:
            continue
        if env.is_env_present():
            return NAMES.get(env.__name__, env.__name__) if env.get_process_count() > 1 else None
    return None


def join(
    coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int], heartbeat_timeout: int
) -> Optional[str]:
    """Joins this process's multi-process run, if any, before anything starts jax's backend: the flags win,
    else the cluster `detect` finds. Returns how it joined ("multi-host flags", "SLURM", ...) or None."""
    import jax

    if coordinator_address:
        if num_processes is None or process_id is None:
            raise Error("--coordinator_address needs --num_processes and --process_id too")
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout
        )
        return "multi-host flags"
    cluster = detect()
    if cluster:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    return cluster


def log_joined(how: Optional[str]) -> None:
    """The start-up line of a multi-process run: how it joined, this process, the coordinator."""
    if how is None:
        return
    import jax

    _, distributed_state = jax_internals()
    logging.info(
        f"cluster: {how}, process {jax.process_index()} of {jax.process_count()}, "
        f"coordinator {distributed_state.coordinator_address}"
    )


def lost_process(e: BaseException) -> Optional[RunFailure]:
    """A failed computation of a multi-process run as one line: most often a collective whose peer is
    gone (a collective that cannot fail, NCCL's, ends after --heartbeat_timeout seconds instead)."""
    import jax

    if not isinstance(e, jax.errors.JaxRuntimeError) or jax.process_count() == 1:
        return None
    parts = first_line(e).split(": ")  # jax repeats "Error dispatching computation: " once per level
    reason = ": ".join(part for i, part in enumerate(parts) if not i or part != parts[i - 1])
    n = jax.process_count()
    return RunFailure(
        f"a computation across the {n} processes failed ({reason}); if a process of this run was lost "
        f"(killed, preempted or crashed: its own log says why), start all {n} again with the same command: "
        f"they resume from the last checkpoint"
    )
