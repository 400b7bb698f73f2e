"""MLflow tracking: the driver creates one run per job; only rank 0 logs into it.

``Tracker`` is the interface the trainer uses; ``NullTracker`` is its no-op twin (tracking
disabled, ranks > 0). A tracking server that goes away never stops training: failed calls are
counted and dropped with one warning per kind.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping, Optional

from aov_dist.tracking.config import TrackingConfig
from aov_dist.tracking.redact import flatten, redact

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "aov.checkpoint."
MAX_PARAM_LEN = 6000


class Tracker:
    run_id: Optional[str] = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None: ...
    def close(self) -> None: ...


class NullTracker(Tracker):
    pass


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker(Tracker):
    def __init__(self, uri: str, run_id: str, system_metrics: bool = False):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self.dropped: dict[str, int] = {}
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10)
                self._monitor.start()
            except Exception as e:  # psutil missing, server down: training goes on
                log.warning("MLflow system metrics disabled: %s", e)

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self.dropped[what] = self.dropped.get(what, 0) + 1
            if self.dropped[what] == 1:
                log.warning("MLflow %s failed (%s); training continues, further failures are counted", what, e)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._guard("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def set_tag(self, key: str, value: str) -> None:
        self._guard("set_tag", self.client.set_tag, self.run_id, key, value)

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self._guard("log_artifact", self.client.log_artifact, self.run_id, local_path, artifact_path)

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass


def make_tracker(cfg: TrackingConfig, run_id: Optional[str], rank: int) -> Tracker:
    if not cfg.enabled or run_id is None or rank != 0:
        return NullTracker()
    return MlflowTracker(cfg.uri, run_id, system_metrics=cfg.system_metrics)


def create_run(cfg: TrackingConfig, run_name: str, resolved: Mapping[str, Any], resolved_yaml: str,
               tags: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Driver only: one run per job, with the redacted flattened config as params and the resolved
    YAML as an artifact. Returns the run id (None when tracking is disabled)."""
    if not cfg.enabled:
        return None
    from mlflow.entities import Param

    client = _client(cfg.uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location
        if location and "://" not in location:
            location = os.path.abspath(location)
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=cfg.run_name or run_name, tags=dict(tags or {}))
    safe = redact(dict(resolved))
    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(safe).items())]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(resolved_yaml)
        client.log_artifact(run.info.run_id, path)
    return run.info.run_id


def finish_run(cfg: TrackingConfig, run_id: Optional[str], status: str = "FINISHED") -> None:
    if cfg.enabled and run_id:
        try:
            _client(cfg.uri).set_terminated(run_id, status=status)
        except Exception as e:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
