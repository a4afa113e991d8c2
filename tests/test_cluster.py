"""Joining a multi-process run without multi-host flags: the cluster jax detects, the flags winning
over it, a one-process job staying one process, and a lost process's computation as one line."""

import os
import re
import shlex
import sys
import warnings
from types import SimpleNamespace

import jax
import pytest
import yaml
from jax._src import clusters
from jax._src.clusters import k8s_cluster

from conftest import ROOT, finish, free_port, start_processes
from resnet_jax import cluster
from resnet_jax.errors import Error

PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "KUBERNETES_", "JOB_COMPLETION_INDEX", "JAX_COORDINATOR")


@pytest.fixture
def no_cluster(monkeypatch):
    """No cluster's variables in the environment, whatever machine the tests run on."""
    for name in list(os.environ):
        if name.startswith(PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


def test_jax_still_exposes_the_private_cluster_api_cluster_py_reads():
    """cluster.jax_internals is the project's one read of jax's private modules; a jax release
    that moves them fails here, by name, instead of in a multi-host run."""
    try:
        cluster_types, distributed_state = cluster.jax_internals()
    except (ImportError, AttributeError) as e:
        pytest.fail(f"jax {jax.__version__} moved what cluster.jax_internals reads ({e}): adapt it")
    names = {env.__name__ for env in cluster_types}
    assert set(cluster.NAMES) <= names, f"jax {jax.__version__} renamed its cluster classes: {sorted(names)}"
    assert all(hasattr(env, "opt_in_only_method") and hasattr(env, "is_env_present") for env in cluster_types)
    assert hasattr(distributed_state, "coordinator_address")


def slurm(ntasks):
    """Task 0's environment in a SLURM job step of `ntasks` tasks."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "node[001-004]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }


def ompi_launch(n=2):
    """The environment Open MPI 4's mpirun gives each of `n` ranks on this machine. jax derives the
    coordinator's port from the job id in OMPI_MCA_orte_hnp_uri (61440 + id // 4096 % 4096)."""
    job_id = (free_port(61440, 65536) - 61440) * 4096
    uri = {"OMPI_MCA_orte_hnp_uri": f"{job_id}.0;tcp://127.0.0.1:{free_port()}", "OMPI_COMM_WORLD_SIZE": str(n)}
    return [([], dict(uri, OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK=str(i))) for i in range(n)]


def test_the_cluster_jax_detects_and_one_process_jobs(no_cluster):
    assert cluster.detect() is None
    for name, value in slurm(ntasks=1).items():
        no_cluster.setenv(name, value)
    assert cluster.detect() is None  # srun -n 1, or a batch script's own shell: one process
    no_cluster.setenv("SLURM_NTASKS", "8")
    assert cluster.detect() == "SLURM"
    for name in slurm(ntasks=1):
        no_cluster.delenv(name)
    for name, value in ompi_launch()[1][1].items():
        no_cluster.setenv(name, value)
    assert cluster.detect() == "Open MPI"
    no_cluster.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert cluster.detect() is None


def test_a_pod_outside_an_indexed_job_runs_alone_and_quietly(no_cluster):
    no_cluster.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # every pod has it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jax warns when the kubernetes package is missing
        assert cluster.detect() is None


def indexed_job_pod(no_cluster, index, parallelism=None, ip="10.1.0.7"):
    """Pod `index` of the Indexed Job of examples/k8s-indexed-job.yaml: the environment Kubernetes
    gives it and, in place of the API server, a `kubernetes` package answering with that Job, its
    headless Service and this pod (`parallelism` in place of the manifest's). jax's K8sCluster reads
    the rest from them. Returns the manifests."""
    with open(os.path.join(ROOT, "examples", "k8s-indexed-job.yaml")) as f:
        manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(f)}
    job, service = manifests["Job"], manifests["Service"]
    name = job["metadata"]["name"]
    no_cluster.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    no_cluster.setenv("JOB_COMPLETION_INDEX", str(index))
    no_cluster.setenv("HOSTNAME", f"{name}-{index}-x7k2p")

    pod = SimpleNamespace(
        metadata=SimpleNamespace(
            name=f"{name}-{index}-x7k2p",
            labels={"job-name": name, "batch.kubernetes.io/job-completion-index": str(index)},
            owner_references=[SimpleNamespace(kind="Job", name=name, controller=True)],
        ),
        spec=SimpleNamespace(subdomain=job["spec"]["template"]["spec"]["subdomain"]),
    )
    job_object = SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels={"job-name": name}),
        spec=SimpleNamespace(parallelism=parallelism or job["spec"]["parallelism"]),
    )
    service_object = SimpleNamespace(
        metadata=SimpleNamespace(name=service["metadata"]["name"]),
        spec=SimpleNamespace(cluster_ip=service["spec"]["clusterIP"], selector=service["spec"]["selector"]),
    )

    class CoreV1Api:
        def list_namespaced_pod(self, namespace, field_selector):
            assert namespace == "training" and field_selector == f"status.podIP={ip}"
            return SimpleNamespace(items=[pod])

        def list_namespaced_service(self, namespace):
            return SimpleNamespace(items=[service_object])

    class BatchV1Api:
        def read_namespaced_job(self, name, namespace):
            assert (name, namespace) == (job_object.metadata.name, "training")
            return job_object

    client = SimpleNamespace(
        CoreV1Api=CoreV1Api, BatchV1Api=BatchV1Api, exceptions=SimpleNamespace(ApiException=type("E", (Exception,), {}))
    )
    no_cluster.setitem(
        sys.modules,
        "kubernetes",
        SimpleNamespace(config=SimpleNamespace(load_incluster_config=lambda: None), client=client),
    )
    # The pod's own IP, and the coordinator's name once its pod is up; no DNS, no API server.
    coordinator = f"{name}-0.{service['metadata']['name']}"
    no_cluster.setattr(
        k8s_cluster.socket, "gethostbyname", lambda host: {pod.metadata.name: ip, coordinator: "10.1.0.5"}[host]
    )
    no_cluster.setattr(k8s_cluster.K8sCluster, "_namespace", classmethod(lambda cls: "training"))
    for attribute in ("_core_api", "_batch_api", "_ApiException"):  # is_env_present sets them: undone after
        no_cluster.setattr(k8s_cluster.K8sCluster, attribute, None, raising=False)
    clear_k8s_caches()
    return manifests


def clear_k8s_caches():
    """K8sCluster caches this pod, its Job, Service and controller for the process: not across tests."""
    for method in ("_pod", "_job", "_headless_svc", "_controller"):
        getattr(k8s_cluster.K8sCluster, method).cache_clear()


@pytest.fixture
def k8s(no_cluster):
    yield no_cluster
    clear_k8s_caches()


@pytest.mark.parametrize("index", [0, 1])
def test_an_indexed_job_pod_joins_as_its_index(k8s, index):
    manifests = indexed_job_pod(k8s, index)
    job = manifests["Job"]
    assert cluster.detect() == "Kubernetes"
    # What jax.distributed.initialize() then finds itself (cluster.join passes it no address, count or id).
    coordinator, count, process_id, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 60
    )
    assert coordinator == f"{job['metadata']['name']}-0.{manifests['Service']['metadata']['name']}:55527"
    assert (count, process_id) == (job["spec"]["parallelism"], index) == (2, index)
    calls = []
    k8s.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cluster.join(None, None, None, 30) == "Kubernetes"
    assert calls == [((), {"heartbeat_timeout_seconds": 30})]


def test_a_one_pod_indexed_job_and_a_job_without_indexes_run_alone(k8s):
    indexed_job_pod(k8s, 0, parallelism=1)
    assert cluster.detect() is None
    indexed_job_pod(k8s, 1)
    k8s.delenv("JOB_COMPLETION_INDEX")  # a pod of a Job that is not Indexed: no index to join with
    assert cluster.detect() is None


def test_the_flags_win_over_the_cluster(no_cluster):
    calls = []
    no_cluster.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cluster.join(None, None, None, 60) is None and calls == []
    for name, value in slurm(ntasks=1).items():
        no_cluster.setenv(name, value)
    assert cluster.join(None, None, None, 60) is None and calls == []
    no_cluster.setenv("SLURM_NTASKS", "2")
    assert cluster.join(None, None, None, 30) == "SLURM"
    assert calls == [((), {"heartbeat_timeout_seconds": 30})]  # jax finds the coordinator, count and index
    assert cluster.join("10.0.0.1:1234", 4, 3, 30) == "multi-host flags"
    assert calls[-1] == (("10.0.0.1:1234", 4, 3), {"heartbeat_timeout_seconds": 30})
    with pytest.raises(Error, match="--coordinator_address needs --num_processes and --process_id too"):
        cluster.join("10.0.0.1:1234", None, 3, 30)


def test_a_failed_computation_of_several_processes_is_one_line(monkeypatch):
    error = jax.errors.JaxRuntimeError(
        "INTERNAL: Error dispatching computation: Error dispatching computation: Gloo all-reduce failed: "
        "Read error [127.0.0.1]:4489: Connection reset by peer\nmore"
    )
    assert cluster.lost_process(error) is None  # one process: a bug, with its traceback
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert cluster.lost_process(ValueError("x")) is None
    failure = cluster.lost_process(error)
    assert failure.exit_code == 1
    assert str(failure) == (
        "a computation across the 2 processes failed (INTERNAL: Error dispatching computation: Gloo all-reduce "
        "failed: Read error [127.0.0.1]:4489: Connection reset by peer); if a process of this run was lost "
        "(killed, preempted or crashed: its own log says why), start all 2 again with the same command: they "
        "resume from the last checkpoint"
    )


def test_the_examples_start_one_process_per_gpu_with_no_multi_host_flags():
    with open(os.path.join(ROOT, "examples", "slurm.sbatch")) as f:
        sbatch = f.read()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", sbatch, re.MULTILINE))
    assert options["ntasks-per-node"] == options["gpus-per-node"]  # one task per GPU, each seeing them all
    assert not {"gpus-per-task", "gpu-bind", "ntasks"} & set(options)
    srun = re.search(r"^srun (.*?[^\\])$", sbatch, re.MULTILINE | re.DOTALL).group(1).replace("\\\n", " ")
    with open(os.path.join(ROOT, "examples", "k8s-indexed-job.yaml")) as f:
        manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(f)}
    job, service = manifests["Job"], manifests["Service"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == job["spec"]["completions"]
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["serviceAccountName"] == manifests["RoleBinding"]["subjects"][0]["name"]
    for command in (shlex.split(srun), pod["containers"][0]["command"]):
        assert command[:2] == ["python", "run.py"] and os.path.exists(os.path.join(ROOT, command[3]))
        assert not any(arg.startswith(("--coordinator_address", "--num_processes", "--process_id")) for arg in command)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mpirun_ranks_join_one_run_without_flags(tmp_path):
    args = ("--config", "configs/smoke.py", "--workdir", str(tmp_path), "--mode", "summary")
    results = finish(start_processes(args, ompi_launch()), timeout=120)
    for i, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "4 x cpu (2 local) in 2 process(es)" in result.stderr
        assert f"cluster: Open MPI, process {i} of 2, coordinator 127.0.0.1:" in result.stderr
        assert "Total Parameters" in result.stdout
