"""Cluster section of the config schema (conf/cluster/*.yaml) and its validation.

One ``ClusterConfig`` drives both the Ray Train ``ScalingConfig`` (workers = nodes x
workers_per_node) and the KubeRay manifests (worker replicas = nodes, GPU limit =
gpus_per_node), so Ray and Kubernetes can never disagree on the worker count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from aov_dist import storage

VALID_BACKENDS = ("gloo", "nccl")
VALID_PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Default config key of the checkpoint storage (owned by the trainer's section); only used to
# name the key in error messages.
DEFAULT_STORAGE_KEY = "train.storage_path"


class ClusterConfigError(ValueError):
    """A cluster setting that cannot work; ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class K8sConfig:
    """Settings used only when rendering KubeRay manifests (python -m aov_dist.cluster.k8s)."""

    namespace: str = "aov"
    image: str = "aov-dist:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: Optional[str] = None
    # Pod placement of the worker group (e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}).
    node_selector: dict[str, str] = field(default_factory=dict)
    # Kubernetes toleration objects, e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}].
    tolerations: list[Any] = field(default_factory=list)
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    # Per worker pod (= per node); None = derived: cpus_per_worker x workers_per_node + 2.
    worker_cpu: Optional[str] = None
    worker_memory: str = "64Gi"
    # In-memory emptyDir mounted on /dev/shm: NCCL and the DataLoader need more than the 64 MiB default.
    shm_size: str = "32Gi"
    # RayJob lifetime: delete the cluster after the job, keep the RayJob object for a while.
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 259200
    # Retries recreate the whole Ray cluster: resume comes from our checkpoint discovery.
    backoff_limit: int = 2
    # What the manifests pin on the training command line: resume after a RayJob is recreated
    # finds <storage_path>/<run_name>/step_<N>/COMMITTED again (our discovery, not Ray's).
    run_name: str = "aov-run"
    storage_path: str = "s3://aov-runs/checkpoints"
    # Replicas of the evaluation watcher's GPU worker group.
    eval_nodes: int = 1
    # Secret names (created by the operator with kubectl, never rendered by us).
    s3_secret: str = "aov-s3"
    mlflow_client_secret: str = "aov-mlflow-client"
    mlflow_server_secret: str = "aov-mlflow-server"
    # Non-secret endpoints given to every pod; None = AWS S3 / the in-namespace MLflow service.
    s3_endpoint_url: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None
    # Must contain mlflow, psycopg (3) and boto3 (k8s/docker/mlflow.Dockerfile).
    mlflow_image: str = "aov-mlflow:3.17.2"
    mlflow_artifacts_destination: str = "s3://aov-mlflow/artifacts"


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    # Worker processes per node: one per GPU on GPU clusters, CPU processes locally.
    workers_per_node: int = 2
    use_gpu: bool = False
    # GPUs of one node (0 on CPU); with use_gpu every worker owns exactly one GPU.
    gpus_per_node: int = 0
    # Ray accelerator type (e.g. "H100", "A100"): workers only land on nodes of that kind.
    accelerator_type: Optional[str] = None
    # CPU cores reserved per worker: the rank itself plus its DataLoader worker processes.
    cpus_per_worker: int = 1
    # gloo on CPU, nccl on GPU
    backend: str = "gloo"
    placement_strategy: str = "PACK"
    # Ray address; None = start (or join) a local Ray instance
    address: Optional[str] = None
    # A local checkpoint path is allowed on several nodes only when it is one shared mount (NFS).
    shared_filesystem: bool = False
    # environment for every worker (NCCL settings etc.)
    env: dict[str, str] = field(default_factory=dict)
    # Ray Train restarts the whole worker group this many times after a worker dies (preemption,
    # a lost node, an NCCL error); the group resumes from the newest committed checkpoint.
    max_failures: int = 0
    # Elastic training: after losing workers (a preempted or removed node) Ray Train restarts the
    # group on as many as it can place, down to this many, and grows it back towards
    # nodes x workers_per_node when resources return; each restart resumes the newest checkpoint,
    # resharded for the new number (ZeRO-3 only). None = a fixed group of nodes x workers_per_node.
    # Restarts count against max_failures.
    min_workers: Optional[int] = None
    # Memory of one GPU in GiB (the planner's budget per worker); 0 on CPU clusters.
    gpu_memory_gib: float = 0.0
    k8s: K8sConfig = field(default_factory=K8sConfig)

    @property
    def num_workers(self) -> int:
        return self.nodes * self.workers_per_node

    @property
    def worker_counts(self) -> range:
        """Every number of workers the job may run on (one unless elastic)."""
        return range(self.num_workers if self.min_workers is None else self.min_workers, self.num_workers + 1)

    @property
    def accelerator(self) -> str:
        """DeepSpeed's accelerator on every worker: cuda on GPU clusters, cpu otherwise."""
        return "cuda" if self.use_gpu else "cpu"

    def validate(self) -> None:
        """Raise ClusterConfigError naming the offending cluster.<key>."""
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ClusterConfigError("cluster.max_failures", f"must be -1 (unlimited) or >= 0, got {self.max_failures!r}")
        for key in ("nodes", "workers_per_node", "cpus_per_worker"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ClusterConfigError(f"cluster.{key}", f"must be an integer >= 1, got {value!r}")
        if self.min_workers is not None and not (isinstance(self.min_workers, int)
                                                 and 1 <= self.min_workers <= self.num_workers):
            raise ClusterConfigError("cluster.min_workers", f"must be null or 1..{self.num_workers} (nodes x "
                                     f"workers_per_node), got {self.min_workers!r}")
        if self.backend not in VALID_BACKENDS:
            raise ClusterConfigError("cluster.backend", f"must be one of {VALID_BACKENDS}, got {self.backend!r}")
        if self.placement_strategy not in VALID_PLACEMENT:
            raise ClusterConfigError("cluster.placement_strategy",
                                     f"must be one of {VALID_PLACEMENT}, got {self.placement_strategy!r}")
        if self.use_gpu:
            if self.gpus_per_node < 1:
                raise ClusterConfigError("cluster.gpus_per_node", "must be >= 1 when cluster.use_gpu=true")
            # DeepSpeed runs one process per GPU: more workers would share a device, fewer waste one.
            if self.workers_per_node != self.gpus_per_node:
                raise ClusterConfigError(
                    "cluster.workers_per_node",
                    f"must equal cluster.gpus_per_node ({self.gpus_per_node}) on GPU clusters "
                    f"(one worker per GPU), got {self.workers_per_node}")
        else:
            if self.backend == "nccl":
                raise ClusterConfigError("cluster.backend", "nccl needs GPUs: use gloo with cluster.use_gpu=false")
            if self.gpus_per_node != 0:
                raise ClusterConfigError("cluster.gpus_per_node",
                                         f"must be 0 when cluster.use_gpu=false, got {self.gpus_per_node}")
        bad_env = [k for k, v in self.env.items() if not isinstance(v, str)]
        if bad_env:
            raise ClusterConfigError(f"cluster.env.{bad_env[0]}", "environment values must be strings "
                                     "(quote numbers in YAML: '1')")


def deepspeed_accelerator(cfg: ClusterConfig, environ: Optional[Mapping[str, str]] = None) -> str:
    """The accelerator the workers must use (``cfg.accelerator``). A DS_ACCELERATOR the user
    exported is accepted only when it agrees: a CPU accelerator on GPU nodes trains on no GPU."""
    env = os.environ if environ is None else environ
    given = (env.get("DS_ACCELERATOR") or "").strip()
    if given and given != cfg.accelerator:
        raise ClusterConfigError(
            "cluster.use_gpu", f"{str(cfg.use_gpu).lower()} means DeepSpeed's {cfg.accelerator!r} accelerator on "
            f"every worker, but DS_ACCELERATOR={given!r} is set in this environment: unset it (the cluster "
            f"section decides) or pick a cluster preset that matches it")
    return cfg.accelerator


def to_cluster_config(cfg: Union[ClusterConfig, Any]) -> ClusterConfig:
    """A ClusterConfig from itself, a DictConfig or a plain dict (unknown keys are an error)."""
    if isinstance(cfg, ClusterConfig):
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def validate_cluster(cluster_cfg: Union[ClusterConfig, Any], storage_path: Optional[str],
                     num_nodes: Optional[int] = None, storage_key: str = DEFAULT_STORAGE_KEY) -> ClusterConfig:
    """Check the cluster section and that checkpoints can be shared by ``num_nodes`` nodes.

    Every rank writes its own ZeRO shard files into the checkpoint folder, so on several nodes
    the folder must be one place all of them reach: object storage (s3://...), or a local path
    explicitly declared shared (``cluster.shared_filesystem=true``, e.g. an NFS mount), which must
    then be absolute because each node's job runs in its own working directory.
    Returns the typed config; raises ClusterConfigError naming the key to change.
    """
    cfg = to_cluster_config(cluster_cfg)
    cfg.validate()
    try:
        storage.check_url(storage_path, storage_key)  # what aov_dist.storage cannot write, it refuses
    except storage.UnsupportedURL as e:
        raise ClusterConfigError(storage_key, str(e).split(": ", 1)[1]) from e
    nodes = cfg.nodes if num_nodes is None else num_nodes
    if nodes < 1:
        raise ClusterConfigError("cluster.nodes", f"must be >= 1, got {nodes}")
    if nodes == 1:
        return cfg
    if not storage_path:
        raise ClusterConfigError(storage_key, f"is empty but cluster.nodes={nodes}: a multi-node run needs "
                                 "checkpoint storage every node can reach (s3://bucket/prefix)")
    if storage.is_remote(storage_path):
        return cfg
    if not cfg.shared_filesystem:
        raise ClusterConfigError(
            storage_key,
            f"{storage_path!r} is a node-local path but cluster.nodes={nodes}: each node would write its "
            f"checkpoint shards to its own disk and no node would hold a complete checkpoint. Use object "
            f"storage ({storage_key}=s3://bucket/prefix) or, if this path is one filesystem mounted on every "
            f"node (NFS), say so with cluster.shared_filesystem=true")
    if not storage.local_path(storage_path).startswith("/"):
        raise ClusterConfigError(
            storage_key, f"{storage_path!r} is relative: with cluster.shared_filesystem=true it must be an "
            f"absolute path of the shared mount (every node's job runs in a different working directory)")
    return cfg
