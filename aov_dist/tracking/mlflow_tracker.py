"""MLflow tracking: the driver creates one run per job; only rank 0 logs into it.

``Tracker`` is the interface the trainer uses; ``NullTracker`` is its no-op twin (tracking
disabled, ranks > 0). A tracking server that goes away never stops training: a failed call is
kept in a bounded buffer, the server is left alone for ``retry_after_s`` (so a dead server does
not cost a network timeout per step), and the buffer is flushed on the next call after that;
what overflows the buffer is dropped and counted, with one warning.

``make_tracker`` wraps rank 0's tracker in a ``BackgroundTracker``: the training step only puts the
call on a bounded queue (metric timestamps are taken at the call, i.e. at the step's end) and one
daemon thread sends them in call order, merging the metric rows that queued up meanwhile into one
``log_batch``. A synchronous sqlite write per step cost the step its duration (docs/benchmarks.md).
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from aov_dist.tracking.config import TrackingConfig
from aov_dist.tracking.redact import redact
from aov_dist.tracking.run_info import EXPERIMENT_KIND_TAG, TRAINING_KIND

log = logging.getLogger(__name__)
# Tags on a training run: aov.checkpoint.<step> = the committed step folder (training writes it),
# aov.eval.<step> = its evaluation's state and aov.eval.source_run on an evaluation run (the
# evaluation watcher writes those; eval/watch.py holds the protocol).
CHECKPOINT_TAG = "aov.checkpoint."
EVAL_TAG = "aov.eval."
SOURCE_TAG = "aov.eval.source_run"
MAX_PARAM_LEN = 6000


CLOSE_RETRY_S = 5.0  # between attempts to send the buffer at the end of a job
MetricRow = tuple[Mapping[str, float], int, int]  # (metrics, step, timestamp in ms)
MAX_BATCH_METRICS = 1000  # MLflow's limit of metrics per log_batch request


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
    def __init__(self, uri: str, run_id: str, retry_after_s: float = 30.0, max_buffer: int = 10000,
                 client: Any = None, close_wait_s: float = 0.0):
        self.uri, self.run_id = uri, run_id
        self.close_wait_s = close_wait_s
        self.client = client or _client(uri)
        self.retry_after_s = retry_after_s
        self.pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque(maxlen=max_buffer)
        self.dropped = 0
        self.failures = 0
        self._down_until = 0.0
        self._warned = False

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

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
        self.log_metric_rows([(metrics, step, timestamp_ms or int(time.time() * 1000))])

    def log_metric_rows(self, rows: list[MetricRow]) -> None:
        """Several steps' metrics in as few log_batch calls as MLflow allows (one per 1000)."""
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), ts, step) for metrics, step, ts in rows for k, v in metrics.items()
                 if v is not None]
        for i in range(0, len(batch), MAX_BATCH_METRICS):
            part = batch[i:i + MAX_BATCH_METRICS]
            self._submit("log_metrics", lambda part=part: self.client.log_batch(self.run_id, metrics=part))

    def set_tag(self, key: str, value: str) -> None:
        self._submit("set_tag", lambda: self.client.set_tag(self.run_id, key, value))

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self._submit("log_artifact", lambda: self.client.log_artifact(self.run_id, local_path, artifact_path))

    def close(self) -> None:
        """Send what is buffered. A server that is down at the end of a job (restarting, say) gets
        ``close_wait_s`` to come back before the buffered calls are given up, with a warning."""
        deadline = time.monotonic() + self.close_wait_s
        sent = self.flush(force=True)
        if not sent and self.close_wait_s > 0:
            log.warning("MLflow: %d tracking calls not sent yet (server unreachable); retrying for up to %.0f s",
                        len(self.pending), self.close_wait_s)
        while not sent and time.monotonic() < deadline:
            time.sleep(min(CLOSE_RETRY_S, max(0.0, deadline - time.monotonic())))
            sent = self.flush(force=True)
        if not sent:
            log.warning("MLflow: %d tracking calls could not be sent (server unreachable)", len(self.pending))
        if self.dropped:
            log.warning("MLflow: %d tracking calls were dropped (buffer full)", self.dropped)


class BackgroundTracker(Tracker):
    """Sends another tracker's calls from one daemon thread, in call order; the caller never waits
    for the tracking server. The queue is bounded: when it is full the oldest call is dropped and
    counted (one warning), as the MlflowTracker's own outage buffer does. ``flush`` waits until
    everything queued so far was handed to the inner tracker; ``close`` flushes, stops the thread
    and closes the inner tracker (its last forced flush and warnings)."""

    def __init__(self, inner: MlflowTracker, max_queue: int = 10000, close_timeout_s: float = 120.0):
        self.inner, self.run_id = inner, inner.run_id
        self.close_timeout_s = close_timeout_s
        self._queue: collections.deque[tuple[str, Any]] = collections.deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._busy = False  # the thread holds calls it took off the queue
        self._closing = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="aov-mlflow-tracker", daemon=True)
        self._thread.start()

    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("BackgroundTracker: call after close()")
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow: the tracking queue is full (%d calls); the oldest are dropped",
                                self._queue.maxlen)
            self._queue.append((kind, payload))
            self._cond.notify_all()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # copy: the caller may reuse its dict; the timestamp is the step's, not the write's
        self._put("metrics", (dict(metrics), step, int(time.time() * 1000)))

    def set_tag(self, key: str, value: str) -> None:
        self._put("call", lambda: self.inner.set_tag(key, value))

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self._put("call", lambda: self.inner.log_artifact(local_path, artifact_path))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                taken = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                self._send(taken)
            except Exception as e:  # the inner tracker buffers its own failures; this is a bug guard
                log.warning("MLflow background tracker: %s: %s", type(e).__name__, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, taken: list[tuple[str, Any]]) -> None:
        rows: list[MetricRow] = []
        for kind, payload in taken:
            if kind == "metrics":
                rows.append(payload)
                continue
            if rows:  # metrics queued before this call go first: order is kept
                self.inner.log_metric_rows(rows)
                rows = []
            payload()
        if rows:
            self.inner.log_metric_rows(rows)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call queued so far reached the inner tracker. False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():  # a server call hangs: leave it, never block the job's end
            log.warning("MLflow: tracking calls still being sent after %.0f s; not waiting for them",
                        self.close_timeout_s)
            return
        if self.dropped:
            log.warning("MLflow: %d tracking calls were dropped (queue full)", self.dropped)
        self.inner.close()


def steps_to_keep(cfg: TrackingConfig, run_id: Optional[str], unevaluated: bool, best: Optional[str]) -> set[int]:
    """Checkpoint steps pruning must keep, read from the training run: those whose
    ``aov.checkpoint.<N>`` tag has no ``done`` evaluation tag yet (``unevaluated``), and the step
    with the best value of the metric ``best`` (higher is better unless its name says loss). An
    unreachable server keeps nothing extra (with a warning): pruning stays bounded."""
    if not (cfg.enabled and run_id and (unevaluated or best)):
        return set()
    try:
        client = _client(cfg.uri)
        keep: set[int] = set()
        if unevaluated:
            tags = client.get_run(run_id).data.tags
            steps = [int(k[len(CHECKPOINT_TAG):]) for k in tags if k.startswith(CHECKPOINT_TAG)
                     and k[len(CHECKPOINT_TAG):].isdigit()]
            keep |= {s for s in steps if not tags.get(f"{EVAL_TAG}{s}", "").startswith("done")}
        if best:
            history = client.get_metric_history(run_id, best)
            if history:
                pick = min if "loss" in best.lower() else max
                keep.add(int(pick(history, key=lambda m: m.value).step))
        return keep
    except Exception as e:
        log.warning("MLflow at %s unreachable (%s): pruning keeps no extra checkpoint this time", cfg.uri, e)
        return set()


def text_reporter(cfg: TrackingConfig, run_id: Optional[str]) -> Optional[Callable[[str, str], None]]:
    """``put(text, artifact_file)`` into the run from any rank (a stall report); None without
    tracking. A direct client call: the rank's background tracker may be what is stuck."""
    if not (cfg.enabled and run_id):
        return None

    def put(text: str, artifact_file: str) -> None:
        _client(cfg.uri).log_text(run_id, text, artifact_file)

    return put


def make_tracker(cfg: TrackingConfig, run_id: Optional[str], rank: int, background: bool = True) -> Tracker:
    if not cfg.enabled or run_id is None or rank != 0:
        return NullTracker()
    inner = MlflowTracker(cfg.uri, run_id, close_wait_s=cfg.close_wait_s)
    return BackgroundTracker(inner) if background else inner


def create_run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any], config_yaml: str,
               tags: Optional[Mapping[str, str]] = None, datasets: Sequence[Any] = ()) -> Optional[str]:
    """Driver only: one run per job, with ``params`` (flat, redacted), the resolved (redacted) YAML
    as the ``config.yaml`` artifact and ``datasets`` (MLflow DatasetInputs) as its inputs. Returns
    the run id; None when tracking is disabled or the server cannot be reached (training then runs
    untracked, with a warning)."""
    if not cfg.enabled:
        return None
    try:
        return _create_run(cfg, run_name, params, config_yaml, tags, datasets)
    except Exception as e:
        log.warning("MLflow at %s unreachable (%s): this job runs without tracking", cfg.uri, e)
        return None


def ensure_experiment(client: Any, cfg: TrackingConfig) -> str:
    """The id of ``cfg.experiment``, created when missing (artifacts under ``cfg.artifact_location``),
    marked as a model-training experiment unless someone gave it another kind."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location
        if location and "://" not in location:
            # a folder only means something beside a local store: a tracking server keeps artifacts
            # where it was told to (--artifacts-destination), reachable from every node
            location = None if cfg.uri.startswith(("http://", "https://")) else os.path.abspath(location)
        return client.create_experiment(cfg.experiment, artifact_location=location or None,
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def _create_run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any], config_yaml: str,
                tags: Optional[Mapping[str, str]], datasets: Sequence[Any]) -> str:
    from mlflow.entities import Param

    client = _client(cfg.uri)
    run = client.create_run(ensure_experiment(client, cfg), run_name=cfg.run_name or run_name,
                            tags=dict(tags or {}))
    safe = redact(dict(params))
    batch = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(safe.items())]
    for i in range(0, len(batch), 100):
        client.log_batch(run.info.run_id, params=batch[i:i + 100])
    if datasets:
        client.log_inputs(run.info.run_id, datasets=list(datasets))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(config_yaml)
        client.log_artifact(run.info.run_id, path)
    return run.info.run_id


def finish_run(cfg: TrackingConfig, run_id: Optional[str], status: str = "FINISHED") -> None:
    if cfg.enabled and run_id:
        try:
            _client(cfg.uri).set_terminated(run_id, status=status)
        except Exception as e:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
