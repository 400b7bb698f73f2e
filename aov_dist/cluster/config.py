"""Cluster section of the config schema (conf/cluster/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    # workers per node: GPUs per node on GPU clusters, CPU worker processes locally
    workers_per_node: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # gloo on CPU, nccl on GPU
    backend: str = "gloo"
    # Ray address; None = start (or join) a local Ray instance
    address: Optional[str] = None
    # environment for every worker (NCCL settings etc.)
    env: dict[str, str] = field(default_factory=dict)
