"""MLflow system metrics of a training job: one monitor per node, in the run the driver created.

The first worker of every node starts MLflow's ``SystemMetricsMonitor`` (CPU, memory, disk,
network, and every GPU of the node through nvidia-ml-py: NVML sees the node's GPUs whatever
CUDA_VISIBLE_DEVICES says). On a job of several nodes each series carries its node
(``system/node_3/gpu_5_utilization_percentage``); a one-node job keeps MLflow's plain names.
Where there is no GPU, MLflow skips the GPU monitor at debug level: nothing to see on CPU runs.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from aov_dist.tracking.config import TrackingConfig

log = logging.getLogger(__name__)
SAMPLING_INTERVAL_S = 10


def node_id(node_rank: int, nodes: int) -> Optional[str]:
    return f"node_{node_rank}" if nodes > 1 else None


def start_node_monitor(cfg: TrackingConfig, run_id: Optional[str], node_rank: int, nodes: int) -> Optional[Any]:
    """A started monitor (``.finish()`` stops it), or None when tracking or system metrics are off.
    A monitor that cannot start is a warning: training goes on without it."""
    if not (cfg.enabled and cfg.system_metrics and run_id):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_INTERVAL_S,
                                       node_id=node_id(node_rank, nodes), tracking_uri=cfg.uri)
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing, tracking server down: not a reason to stop training
        log.warning("MLflow system metrics disabled on node %d: %s", node_rank, e)
        return None


def stop_node_monitor(monitor: Optional[Any]) -> None:
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as e:
        log.warning("MLflow system metrics monitor did not stop cleanly: %s", e)
