"""Ray-side translation of the cluster section, shared by the trainer, the evaluator and the probe.

Using these (instead of building ScalingConfig by hand) keeps the Ray worker count equal to the
one the KubeRay manifests provision: nodes x workers_per_node.
"""
from __future__ import annotations

from typing import Any, Optional

from aov_dist.cluster.config import ClusterConfig


def worker_resources(cfg: ClusterConfig) -> dict[str, float]:
    """Per-worker reservation: its CPUs (rank + DataLoader workers) and, on GPU clusters, one GPU."""
    resources: dict[str, float] = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        resources["GPU"] = 1.0
    return resources


def scaling_config(cfg: ClusterConfig):
    """ray.train.ScalingConfig for cfg.num_workers workers with the section's placement; elastic
    (Ray Train's (min, max) range) when cluster.min_workers is below that."""
    from ray.train import ScalingConfig

    counts = cfg.worker_counts
    workers = cfg.num_workers if len(counts) == 1 else (counts[0], counts[-1])
    return ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg),
                         placement_strategy=cfg.placement_strategy, accelerator_type=cfg.accelerator_type)


def runtime_env(cfg: ClusterConfig) -> Optional[dict[str, Any]]:
    """runtime_env for ray.init(): cluster.env (NCCL settings) reaches every worker process."""
    return {"env_vars": dict(cfg.env)} if cfg.env else None
