"""MLflow tracking: the driver creates one run per job; only rank 0 logs into it.

``Tracker`` is the interface the trainer uses; ``NullTracker`` is its no-op twin (tracking
disabled, ranks > 0). A tracking server that goes away never stops training: a failed call is
kept in a bounded buffer, the server is left alone for ``retry_after_s`` (so a dead server does
not cost a network timeout per step), and the buffer is flushed on the next call after that;
what overflows the buffer is dropped and counted, with one warning.
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional

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


# MLflow's HTTP client retries a refused connection 7 times with exponential backoff: measured
# 246 s per call against a dead server, during which the training step blocks. Our tracker
# buffers and retries on its own, so one call may fail fast (about 3 s). The user's own
# environment settings win.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(key, value)

    return MlflowClient(tracking_uri=uri)


class MlflowTracker(Tracker):
    def __init__(self, uri: str, run_id: str, system_metrics: bool = False, retry_after_s: float = 30.0,
                 max_buffer: int = 10000, client: Any = None):
        self.uri, self.run_id = uri, run_id
        self.client = client or _client(uri)
        self.retry_after_s = retry_after_s
        self.pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque(maxlen=max_buffer)
        self.dropped = 0
        self.failures = 0
        self._down_until = 0.0
        self._warned = False
        self._monitor = None
        if system_metrics:
            try:
                import mlflow
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                # the monitor logs through the fluent client: point it at this run's server
                mlflow.set_tracking_uri(uri)

                self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10)
                self._monitor.start()
            except Exception as e:  # psutil missing, server down: training goes on
                log.warning("MLflow system metrics disabled: %s", e)

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1  # the deque evicts the oldest entry
        self.pending.append((what, call))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered, oldest first; stop at the first failure. True when empty."""
        if not force and time.monotonic() < self._down_until:
            return not self.pending
        while self.pending:
            what, call = self.pending[0]
            try:
                call()
            except Exception as e:
                self.failures += 1
                self._down_until = time.monotonic() + self.retry_after_s
                if not self._warned:
                    self._warned = True
                    log.warning("MLflow %s failed (%s); training continues, tracking calls are buffered "
                                "and retried every %.0f s", what, e, self.retry_after_s)
                return False
            self.pending.popleft()
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._submit("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tag(self, key: str, value: str) -> None:
        self._submit("set_tag", lambda: self.client.set_tag(self.run_id, key, value))

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self._submit("log_artifact", lambda: self.client.log_artifact(self.run_id, local_path, artifact_path))

    def close(self) -> None:
        if not self.flush(force=True):
            log.warning("MLflow: %d tracking calls could not be sent (server unreachable)", len(self.pending))
        if self.dropped:
            log.warning("MLflow: %d tracking calls were dropped (buffer full)", self.dropped)
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
    (redacted) YAML as an artifact. Returns the run id; None when tracking is disabled or the
    server cannot be reached (training then runs untracked, with a warning)."""
    if not cfg.enabled:
        return None
    try:
        return _create_run(cfg, run_name, resolved, resolved_yaml, tags)
    except Exception as e:
        log.warning("MLflow at %s unreachable (%s): this job runs without tracking", cfg.uri, e)
        return None


def _create_run(cfg: TrackingConfig, run_name: str, resolved: Mapping[str, Any], resolved_yaml: str,
                tags: Optional[Mapping[str, str]]) -> str:
    from mlflow.entities import Param

    client = _client(cfg.uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location
        if location and "://" not in location:
            location = os.path.abspath(location)
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location or None)
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
