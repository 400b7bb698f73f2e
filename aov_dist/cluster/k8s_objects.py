"""Kubernetes objects (plain dicts) for aov-dist: KubeRay RayJobs and the MLflow server.

Every count comes from one ClusterConfig: worker replicas = cluster.nodes, nvidia.com/gpu =
cluster.gpus_per_node, and the entry point tells the app the same cluster.nodes. Credentials
appear only as Secret references (secretKeyRef); the Secrets themselves are created by the
operator (docs/cluster.md), never rendered here.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from aov_dist.cluster.config import ClusterConfig

RAY_VERSION = "2.60.0"
MLFLOW_NAME = "aov-mlflow"
MLFLOW_PORT = 5000
SHM_VOLUME = "dshm"
APP_LABEL = "app.kubernetes.io/name"
# Keys expected in the operator's Secrets (see docs/cluster.md for the kubectl commands).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_CLIENT_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
MLFLOW_BACKEND_KEY = "backend-store-uri"

Obj = dict[str, Any]


def dns_name(text: str, max_len: int = 40) -> str:
    """A DNS-1123 label; KubeRay appends suffixes to RayJob names, hence the shorter default cap."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = name[:max_len].rstrip("-")
    if not name:
        raise ValueError(f"cannot make a Kubernetes name from {text!r}")
    return name


def tracking_uri(cfg: ClusterConfig) -> str:
    return cfg.k8s.mlflow_tracking_uri or f"http://{MLFLOW_NAME}.{cfg.k8s.namespace}.svc.cluster.local:{MLFLOW_PORT}"


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> Obj:
    ref: Obj = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def pod_env(cfg: ClusterConfig) -> list[Obj]:
    """Environment of every Ray pod: cluster.env (NCCL), endpoints, and Secret references."""
    env: list[Obj] = [{"name": k, "value": str(v)} for k, v in sorted(cfg.env.items())]
    env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking_uri(cfg)})
    if cfg.k8s.s3_endpoint_url:
        env += [{"name": "AWS_ENDPOINT_URL", "value": cfg.k8s.s3_endpoint_url}]
    env += [_secret_env(k, cfg.k8s.s3_secret, k) for k in S3_KEYS]
    # Optional: an MLflow server without authentication needs no client Secret.
    env += [_secret_env(k, cfg.k8s.mlflow_client_secret, k, optional=True) for k in MLFLOW_CLIENT_KEYS]
    return env


def _shm_volume(size: str) -> Obj:
    # The container runtime's default /dev/shm is 64 MiB: NCCL and DataLoader workers need more.
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def _pod_spec(cfg: ClusterConfig, container: Obj, shm_size: str, gpu_pod: bool) -> Obj:
    spec: Obj = {"containers": [container], "volumes": [_shm_volume(shm_size)]}
    if cfg.k8s.service_account:
        spec["serviceAccountName"] = cfg.k8s.service_account
    if gpu_pod and cfg.k8s.node_selector:
        spec["nodeSelector"] = dict(cfg.k8s.node_selector)
    if gpu_pod and cfg.k8s.tolerations:
        spec["tolerations"] = [dict(t) for t in cfg.k8s.tolerations]
    return spec


def _container(cfg: ClusterConfig, name: str, resources: Obj, ports: Optional[list[Obj]] = None) -> Obj:
    c: Obj = {"name": name, "image": cfg.k8s.image, "imagePullPolicy": cfg.k8s.image_pull_policy,
              "env": pod_env(cfg), "resources": resources,
              "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]}
    if ports:
        c["ports"] = ports
    return c


def worker_cpu(cfg: ClusterConfig) -> str:
    # The workers' reservations plus two cores for the raylet, object store and agents.
    return cfg.k8s.worker_cpu or str(cfg.cpus_per_worker * cfg.workers_per_node + 2)


def ray_cluster_spec(cfg: ClusterConfig, replicas: int) -> Obj:
    head_res = {"cpu": cfg.k8s.head_cpu, "memory": cfg.k8s.head_memory}
    head = _container(cfg, "ray-head", {"requests": dict(head_res), "limits": dict(head_res)},
                      ports=[{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                             {"name": "client", "containerPort": 10001}])
    worker_res: Obj = {"cpu": worker_cpu(cfg), "memory": cfg.k8s.worker_memory}
    if cfg.use_gpu:
        worker_res["nvidia.com/gpu"] = str(cfg.gpus_per_node)
    worker = _container(cfg, "ray-worker", {"requests": dict(worker_res), "limits": dict(worker_res)})
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            # num-cpus 0: no training or evaluation worker is ever scheduled on the head.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"spec": _pod_spec(cfg, head, "2Gi", gpu_pod=False)},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if cfg.use_gpu else "cpu-workers",
            # Fixed size: every node of the run must exist before the process group forms.
            "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
            "rayStartParams": {},
            "template": {"spec": _pod_spec(cfg, worker, cfg.k8s.shm_size, gpu_pod=True)},
        }],
    }


def ray_job(cfg: ClusterConfig, name: str, component: str, entrypoint: str, replicas: int) -> Obj:
    labels = {APP_LABEL: "aov-dist", "app.kubernetes.io/component": component,
              "aov-dist/run-name": dns_name(cfg.k8s.run_name, 63), "aov-dist/nodes": str(replicas)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": dns_name(name), "namespace": cfg.k8s.namespace, "labels": labels},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": cfg.k8s.ttl_seconds_after_finished,
            "activeDeadlineSeconds": cfg.k8s.active_deadline_seconds,
            # Each retry is a new Ray cluster; the fixed run name makes the app resume from
            # <storage>/<run>/ (latest COMMITTED step), not from anything Ray remembers.
            "backoffLimit": cfg.k8s.backoff_limit,
            "rayClusterSpec": ray_cluster_spec(cfg, replicas),
        },
    }


def mlflow_objects(cfg: ClusterConfig) -> list[Obj]:
    """Deployment + Service of an MLflow tracking server: PostgreSQL store, proxied S3 artifacts."""
    ns = cfg.k8s.namespace
    labels = {APP_LABEL: MLFLOW_NAME}
    svc = f"{MLFLOW_NAME}.{ns}.svc.cluster.local"
    # Host headers MLflow 3 accepts (it rejects unknown ones against DNS rebinding).
    hosts = ",".join(h for base in (MLFLOW_NAME, f"{MLFLOW_NAME}.{ns}", f"{MLFLOW_NAME}.{ns}.svc", svc, "localhost")
                     for h in (base, f"{base}:{MLFLOW_PORT}"))
    env: list[Obj] = [
        # mlflow server reads its store URI from this variable: the password stays in the Secret.
        _secret_env("MLFLOW_BACKEND_STORE_URI", cfg.k8s.mlflow_server_secret, MLFLOW_BACKEND_KEY),
        {"name": "MLFLOW_ARTIFACTS_DESTINATION", "value": cfg.k8s.mlflow_artifacts_destination},
        {"name": "MLFLOW_SERVER_ALLOWED_HOSTS", "value": hosts},
        *[_secret_env(k, cfg.k8s.s3_secret, k) for k in S3_KEYS],
    ]
    if cfg.k8s.s3_endpoint_url:
        env.append({"name": "MLFLOW_S3_ENDPOINT_URL", "value": cfg.k8s.s3_endpoint_url})
    probe = {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "periodSeconds": 10}
    container = {
        "name": "mlflow", "image": cfg.k8s.mlflow_image, "imagePullPolicy": cfg.k8s.image_pull_policy,
        "command": ["mlflow", "server"],
        "args": ["--host", "0.0.0.0", "--port", str(MLFLOW_PORT), "--serve-artifacts"],
        "env": env, "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": {**probe, "initialDelaySeconds": 10},
        "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": MLFLOW_NAME, "namespace": ns, "labels": dict(labels)},
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": MLFLOW_NAME, "namespace": ns, "labels": dict(labels)},
        "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": MLFLOW_PORT}]},
    }
    return [deployment, service]


def namespace(cfg: ClusterConfig) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.k8s.namespace}}


def secret_refs(objs: Sequence[Obj]) -> set[tuple[str, str]]:
    """(secret, key) pairs referenced anywhere in ``objs`` (documentation and tests)."""
    found: set[tuple[str, str]] = set()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if "secretKeyRef" in o:
                found.add((o["secretKeyRef"]["name"], o["secretKeyRef"]["key"]))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(list(objs))
    return found
