"""Tracking section of the config schema (conf/tracking/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Embedded default: a local sqlite store; point at any MLflow server with http://...
    uri: str = "sqlite:///mlflow.db"
    # Artifact root of a NEW experiment (local folder or s3://); None = the server's default.
    artifact_location: Optional[str] = "mlartifacts"
    experiment: str = "aov-dist"
    run_name: Optional[str] = None
    system_metrics: bool = True
    registered_model_name: Optional[str] = "aov-tiny"
