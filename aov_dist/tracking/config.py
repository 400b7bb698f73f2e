"""Tracking section of the config schema (conf/tracking/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Embedded default: a local sqlite store; point at any MLflow server with http://...
    uri: str = "sqlite:///mlflow.db"
    # Artifact root of a NEW experiment (s3://, or a local folder for a local store: with an
    # http(s) tracking server a folder is ignored and the server's artifact destination is used);
    # None = the store's or server's default.
    artifact_location: Optional[str] = "mlartifacts"
    experiment: str = "aov-dist"
    run_name: Optional[str] = None
    # MLflow system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py on GPU clusters),
    # one series per node on multi-node jobs
    system_metrics: bool = True
    # Seconds the end of a job waits for an unreachable tracking server (a restart) before the
    # metrics and tags it buffered are given up (0 = one last try).
    close_wait_s: float = 120.0
    # Model Registry name of the final model. None = from the model preset and the stage
    # (registered_model_name below: aov-0.5b-stage2, aov-tiny-stage1, ...); "" = not registered.
    registered_model_name: Optional[str] = None


def registered_model_name(cfg: TrackingConfig, preset: str, stage: str) -> Optional[str]:
    """The registry name a job's final model gets: the configured one, or ``aov-<preset>-<stage>``
    so that runs of different models and stages never become versions of one registered model."""
    if cfg.registered_model_name is not None:
        return cfg.registered_model_name or None
    model = preset.replace("_", "-")
    return f"{model if model.startswith('aov') else 'aov-' + model}-{stage}"
