"""Follow MLflow training runs and evaluate every committed checkpoint exactly once.

Protocol (tags on the TRAINING run):
  * ``aov.checkpoint.<step>`` = URI of the committed step folder (written by training);
  * ``aov.eval.<step>`` = state of its evaluation, written by this watcher:
      ``running:<attempt>:<eval_run_id>`` while an attempt is under way,
      ``done:<eval_run_id>`` once metrics are logged (never evaluated again),
      ``failed:<attempts>: <message>`` after a failed attempt (retried until eval.max_attempts).
Metrics go to the training run at the checkpoint's step (``eval/...`` names) and to an evaluation
run in the same experiment, nested under the training run (``mlflow.parentRunId``) and linked by
``aov.eval.source_run`` / ``aov.eval.step``; the per-sample tables and the pictures (ROC curve,
confusion matrix, anomaly maps) are artifacts of that run. Both runs get an ``eval/summary.json``
table: the evaluation's headline figures, and on the training run one row per checkpoint.

Restart safety: a ``running`` tag left by a watcher that died is resolved on the next scan: if its
evaluation run finished, the step is marked done without re-evaluation; otherwise the attempt counts
as failed. One watcher per experiment is assumed (a live concurrent one would look crashed).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from mlflow.entities import Metric

from aov_dist.eval.checkpoints import is_mlflow_uri
from aov_dist.eval.evaluate import SUMMARY_TABLE, EvalResult, log_result
from aov_dist.tracking.mlflow_tracker import CHECKPOINT_TAG as CKPT_TAG
from aov_dist.tracking.mlflow_tracker import EVAL_TAG, MAX_BATCH_METRICS, SOURCE_TAG
from aov_dist.train.checkpoint import COMMIT_MARKER, is_committed

log = logging.getLogger(__name__)

EvaluateFn = Callable[[str], EvalResult]


@dataclass(frozen=True)
class EvalState:
    status: str  # new | running | done | failed
    attempts: int = 0
    eval_run_id: Optional[str] = None
    message: str = ""


def parse_state(value: Optional[str]) -> EvalState:
    if not value:
        return EvalState("new")
    kind, _, rest = value.partition(":")
    if kind == "done":
        return EvalState("done", eval_run_id=rest)
    if kind == "running":
        attempt, _, run_id = rest.partition(":")
        return EvalState("running", int(attempt or 1), run_id or None)
    if kind == "failed":
        n, _, msg = rest.partition(":")
        return EvalState("failed", int(n or 1), message=msg.strip())
    raise ValueError(f"unreadable evaluation state tag value {value!r}")


def checkpoints_of(tags: dict[str, str]) -> dict[int, str]:
    out = {}
    for k, v in tags.items():
        if k.startswith(CKPT_TAG) and k[len(CKPT_TAG):].isdigit():
            out[int(k[len(CKPT_TAG):])] = v
    return dict(sorted(out.items()))


def _short(msg: str, limit: int = 400) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


class Watcher:
    """``evaluate_fn`` may be an ``evaluate.Evaluator``: its Ray workers then serve every checkpoint
    of a scan (and of consecutive busy polls) and, with ``release_when_idle``, are stopped after a
    poll that found nothing to evaluate, so idle watching holds no CPUs or GPUs."""

    def __init__(self, client, evaluate_fn: EvaluateFn, max_attempts: int = 3, pictures: bool = True,
                 release_when_idle: bool = True):
        self.client = client
        self.release_when_idle = release_when_idle
        self.pictures = pictures  # ROC / confusion / anomaly-map PNGs on the evaluation run
        self.evaluate_fn = evaluate_fn
        self.max_attempts = max_attempts

    # ---------------------------------------------------------------- one checkpoint
    def _recover(self, run_id: str, step: int, state: EvalState) -> EvalState:
        """A 'running' tag found at scan time belongs to a watcher that died."""
        tag = f"{EVAL_TAG}{step}"
        if state.eval_run_id:
            try:
                eval_run = self.client.get_run(state.eval_run_id)
            except Exception:  # deleted run: the attempt is lost
                eval_run = None
            if eval_run is not None and eval_run.info.status == "FINISHED":
                self.client.set_tag(run_id, tag, f"done:{state.eval_run_id}")
                return EvalState("done", eval_run_id=state.eval_run_id)
            if eval_run is not None and eval_run.info.status == "RUNNING":
                self.client.set_terminated(state.eval_run_id, "KILLED")
        msg = "evaluation interrupted (watcher restarted)"
        self.client.set_tag(run_id, tag, f"failed:{state.attempts}: {msg}")
        return EvalState("failed", state.attempts, message=msg)

    def process(self, train_run, step: int, uri: str) -> str:
        """Evaluate one checkpoint if it needs it; returns what happened (for logs and tests)."""
        run_id = train_run.info.run_id
        tag = f"{EVAL_TAG}{step}"
        state = parse_state(train_run.data.tags.get(tag))
        if state.status == "running":
            state = self._recover(run_id, step, state)
        if state.status == "done":
            return "done-before"
        if state.status == "failed" and state.attempts >= self.max_attempts:
            return "gave-up"
        if not is_mlflow_uri(uri) and not is_committed(uri):
            log.warning("run %s step %d: %s has no %s marker yet; skipping", run_id, step, uri, COMMIT_MARKER)
            return "not-committed"
        attempt = state.attempts + 1
        run_name = f"eval-{train_run.info.run_name or run_id[:8]}-step{step}"
        eval_run = self.client.create_run(
            train_run.info.experiment_id, run_name=run_name,
            tags={"mlflow.parentRunId": run_id, SOURCE_TAG: run_id, "aov.eval.step": str(step),
                  "aov.eval.attempt": str(attempt)})
        eval_id = eval_run.info.run_id
        self.client.set_tag(run_id, tag, f"running:{attempt}:{eval_id}")
        log.info("run %s step %d: evaluating %s (attempt %d, eval run %s)", run_id, step, uri, attempt, eval_id)
        try:
            result = self.evaluate_fn(uri)
            log_result(self.client, eval_id, result, step=step, pictures=self.pictures)
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in sorted(result.flat_metrics().items())]
            for i in range(0, len(metrics), MAX_BATCH_METRICS):
                self.client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH_METRICS])
            row = {"step": step, "checkpoint": uri, "eval_run": eval_id, **result.summary()}
            self.client.log_table(run_id, {k: [v] for k, v in row.items()}, SUMMARY_TABLE)
        except Exception as e:  # recorded, retried on a later scan; the watcher keeps going
            log.exception("run %s step %d: evaluation failed", run_id, step)
            self.client.set_terminated(eval_id, "FAILED")
            self.client.set_tag(run_id, tag, f"failed:{attempt}: {_short(f'{type(e).__name__}: {e}')}")
            return "failed"
        self.client.set_terminated(eval_id, "FINISHED")
        self.client.set_tag(run_id, tag, f"done:{eval_id}")
        return "evaluated"

    # ---------------------------------------------------------------- scanning
    def training_runs(self, experiment: Optional[str] = None, run_id: Optional[str] = None) -> list:
        if run_id:
            return [self.client.get_run(run_id)]
        exp = self.client.get_experiment_by_name(experiment) if experiment else None
        if exp is None:
            raise ValueError(f"tracking.experiment={experiment!r}: no such MLflow experiment")
        runs = self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                       max_results=5000)
        return [r for r in runs if SOURCE_TAG not in r.data.tags and checkpoints_of(r.data.tags)]

    def scan_once(self, experiment: Optional[str] = None, run_id: Optional[str] = None) -> list[tuple[str, int, str]]:
        events = []
        for run in self.training_runs(experiment, run_id):
            for step, uri in checkpoints_of(run.data.tags).items():
                outcome = self.process(run, step, uri)
                events.append((run.info.run_id, step, outcome))
                if outcome in ("evaluated", "failed"):
                    run = self.client.get_run(run.info.run_id)  # fresh tags for the next step
        return events

    def watch(self, experiment: Optional[str] = None, run_id: Optional[str] = None, poll_s: float = 60.0,
              max_idle_polls: Optional[int] = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Scan forever (or until ``max_idle_polls`` scans in a row found nothing to evaluate)."""
        idle = 0
        while True:
            events = self.scan_once(experiment, run_id)
            busy = any(e[2] in ("evaluated", "failed") for e in events)
            idle = 0 if busy else idle + 1
            release = getattr(self.evaluate_fn, "release", None)
            if not busy and self.release_when_idle and callable(release):
                release()
            if max_idle_polls is not None and idle >= max_idle_polls:
                return
            sleep(poll_s)
