"""MLflow tracking: one run per job with redacted params and the resolved YAML, rank-0 tracker that
buffers through a tracking outage, and a no-op twin."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from aov_dist.tracking.config import TrackingConfig
from aov_dist.tracking.mlflow_tracker import MlflowTracker, NullTracker, create_run, make_tracker
from aov_dist.tracking.redact import MASK, flatten, redact
from aov_dist.tracking.run_info import EXPERIMENT_KIND_TAG, TRAINING_KIND, compared_params
from train_harness import free_port

RESOLVED = {
    "stage": {"name": "stage1", "lr": {"expert": 1e-4}},
    "eval": {"judge": {"api_key": "sk-live-123", "api_key_env": "AOV_JUDGE_API_KEY", "base_url": None}},
    "storage": {"aws_secret_access_key": "abc", "password": "", "datasets": [{"name": "s", "token": "t0k"}]},
}


def test_redact_masks_secret_values_only():
    safe = redact(RESOLVED)
    assert safe["eval"]["judge"] == {"api_key": MASK, "api_key_env": "AOV_JUDGE_API_KEY", "base_url": None}
    assert safe["storage"]["aws_secret_access_key"] == MASK
    assert safe["storage"]["password"] == ""  # nothing to hide
    assert safe["storage"]["datasets"] == [{"name": "s", "token": MASK}]
    assert safe["stage"] == RESOLVED["stage"]
    assert RESOLVED["eval"]["judge"]["api_key"] == "sk-live-123"  # the input is not modified


def test_flatten_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_create_run_one_run_with_compared_params_redacted_and_yaml(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="exp-a", system_metrics=False)
    params = {**compared_params(RESOLVED), "eval.judge.api_key": "sk-live-123"}
    run_id = create_run(cfg, "job-1", params, "stage:\n  name: stage1\n", tags={"aov.stage": "stage1"})
    client = MlflowClient(cfg.uri)
    exp = client.get_experiment_by_name("exp-a")
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND  # the UI opens it on training runs
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == "job-1" and run.data.tags["aov.stage"] == "stage1"
    assert run.data.params == {"stage.name": "stage1", "stage.lr.expert": "0.0001", "data.datasets": "",
                               "eval.judge.api_key": MASK}
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert open(local).read() == "stage:\n  name: stage1\n"


def test_an_existing_experiment_gets_the_training_kind_unless_it_has_one(tmp_path):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.mlflow_tracker import ensure_experiment

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="old")
    client = MlflowClient(cfg.uri)
    old = client.create_experiment("old")
    client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    assert ensure_experiment(client, cfg) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    cfg.experiment = "mine"
    ensure_experiment(client, cfg)
    assert client.get_experiment_by_name("mine").tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_disabled_tracking_creates_nothing(tmp_path):
    cfg = TrackingConfig(enabled=False, uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert create_run(cfg, "job", {}, "") is None
    assert not (tmp_path / "mlflow.db").exists()
    assert isinstance(make_tracker(cfg, "some-run", rank=0), NullTracker)
    on = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", system_metrics=False)
    assert isinstance(make_tracker(on, "some-run", rank=1), NullTracker)  # only rank 0 logs
    assert isinstance(make_tracker(on, None, rank=0), NullTracker)


class _FlakyClient:
    """Fails while ``down``; records what reached the 'server'."""

    def __init__(self):
        self.down = False
        self.calls: list[tuple] = []

    def _call(self, *args):
        if self.down:
            raise ConnectionError("tracking server down")
        self.calls.append(args)

    def log_batch(self, run_id, metrics=()):
        self._call("metrics", run_id, [(m.key, m.value, m.step) for m in metrics])

    def set_tag(self, run_id, key, value):
        self._call("tag", run_id, key, value)


def test_tracker_buffers_through_an_outage_and_flushes_in_order(caplog, monkeypatch):
    # another Hydra app in this pytest process may have disabled existing loggers
    monkeypatch.setattr(logging.getLogger("aov_dist.tracking.mlflow_tracker"), "disabled", False)
    client = _FlakyClient()
    t = MlflowTracker("http://unused", "run-1", client=client, retry_after_s=0.0)
    t.log_metrics({"loss": 1.0}, step=1)
    client.down = True
    t.log_metrics({"loss": 0.9}, step=2)  # must not raise
    t.set_tag("aov.checkpoint.2", "/ckpt/step_2")
    assert len(t.pending) == 2 and t.failures == 2  # retry_after_s=0: every call tries again
    assert "training continues" in caplog.text
    client.down = False
    t.log_metrics({"loss": 0.8}, step=3)
    assert not t.pending
    assert client.calls == [("metrics", "run-1", [("loss", 1.0, 1)]), ("metrics", "run-1", [("loss", 0.9, 2)]),
                            ("tag", "run-1", "aov.checkpoint.2", "/ckpt/step_2"),
                            ("metrics", "run-1", [("loss", 0.8, 3)])]


def test_tracker_leaves_a_dead_server_alone_and_drops_overflow():
    client = _FlakyClient()
    client.down = True
    t = MlflowTracker("http://unused", "run-1", client=client, retry_after_s=3600.0, max_buffer=3)
    for step in range(5):
        t.log_metrics({"loss": float(step)}, step=step)
    assert t.failures == 1  # one attempt, then no calls until retry_after_s has passed
    assert t.dropped == 2 and len(t.pending) == 3
    client.down = False
    t.close()  # close forces a last flush: the 3 newest entries arrive
    assert [c[2][0][2] for c in client.calls] == [2, 3, 4]


class _RestartingClient(_FlakyClient):
    """Down until its ``attempts``-th call: a server that comes back after a restart."""

    def __init__(self, attempts: int):
        super().__init__()
        self.down, self.attempts, self.tries = True, attempts, 0

    def _call(self, *args):
        self.tries += 1
        self.down = self.tries < self.attempts
        super()._call(*args)


def test_the_end_of_a_job_waits_a_bounded_time_for_a_restarting_server(monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("aov_dist.tracking.mlflow_tracker"), "disabled", False)
    monkeypatch.setattr("aov_dist.tracking.mlflow_tracker.CLOSE_RETRY_S", 0.01)
    client = _RestartingClient(attempts=4)
    t = MlflowTracker("http://unused", "run-1", client=client, retry_after_s=3600.0, close_wait_s=30.0)
    for step in (1, 2):
        t.log_metrics({"loss": float(step)}, step=step)
    t.close()  # attempt 2 and 3 fail, the 4th finds the server back
    assert [c[2][0][2] for c in client.calls] == [1, 2] and not t.pending
    assert "retrying for up to 30 s" in caplog.text and "could not be sent" not in caplog.text

    gone = _RestartingClient(attempts=10 ** 9)
    t = MlflowTracker("http://unused", "run-1", client=gone, retry_after_s=3600.0, close_wait_s=0.2)
    t.log_metrics({"loss": 1.0}, step=1)
    t0 = time.monotonic()
    t.close()
    assert time.monotonic() - t0 < 5 and gone.tries > 2 and not gone.calls
    assert "MLflow: 1 tracking calls could not be sent (server unreachable)" in caplog.text


def test_unreachable_server_at_job_start_runs_untracked(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = free_port()  # closed again: nobody listens there
    t0 = time.monotonic()
    assert create_run(TrackingConfig(uri=f"http://127.0.0.1:{port}"), "job", {}, "") is None
    assert time.monotonic() - t0 < 30  # a generous failsafe against a hang (no retries: about 1 s)


class _GatedClient(_FlakyClient):
    """Every call waits until ``gate`` is set: a tracking server slower than the training step.
    ``entered`` is set once a call waits there; ``callers`` are the threads that made the calls."""

    def __init__(self):
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()
        self.callers: list[threading.Thread] = []

    def _call(self, *args):
        self.callers.append(threading.current_thread())
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        super()._call(*args)


def test_background_tracker_never_blocks_and_sends_everything_in_order():
    from aov_dist.tracking.mlflow_tracker import BackgroundTracker

    client = _GatedClient()
    t = BackgroundTracker(MlflowTracker("http://unused", "run-1", client=client, retry_after_s=0.0))
    for step in range(1, 6):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
        if step == 3:
            t.set_tag("aov.checkpoint.3", "/ckpt/step_3")
    # every call returned while the server has answered nothing yet (the gate is still closed)
    assert client.calls == [] and not client.gate.is_set()
    assert client.entered.wait(30)  # the tracker's thread is waiting on the server meanwhile
    client.gate.set()
    t.close()
    # the server was only ever called from the tracker's thread, never from the caller's
    assert client.callers and threading.current_thread() not in client.callers
    # metric rows queued together went out as one log_batch; the tag stays between steps 3 and 4
    events = [x for c in client.calls for x in ([("tag", c[2])] if c[0] == "tag" else [(k, s) for k, _, s in c[2]])]
    assert events == [(k, s) for s in range(1, 4) for k in ("loss", "lr")] + [("tag", "aov.checkpoint.3")] + \
        [(k, s) for s in range(4, 6) for k in ("loss", "lr")]
    assert len(client.calls) < 6  # 5 metric rows + 1 tag, merged while the server was slow


def test_background_tracker_keeps_the_step_timestamp(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="bg", system_metrics=False)
    run_id = create_run(cfg, "job", {}, "")
    t = make_tracker(cfg, run_id, rank=0)
    before = int(time.time() * 1000)
    for step in range(1, 41):
        t.log_metrics({"loss": float(step), "tokens_per_s": 2.0 * step}, step=step)
    after = int(time.time() * 1000)
    time.sleep(0.05)
    t.close()
    hist = MlflowClient(cfg.uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(s, float(s)) for s in range(1, 41)]
    # the time of the log_metrics call (the step's end), not of the later write
    assert all(before <= m.timestamp <= after for m in hist)
    assert len(MlflowClient(cfg.uri).get_metric_history(run_id, "tokens_per_s")) == 40


def test_background_tracker_drops_the_oldest_when_its_queue_is_full():
    from aov_dist.tracking.mlflow_tracker import BackgroundTracker

    client = _GatedClient()
    t = BackgroundTracker(MlflowTracker("http://unused", "run-1", client=client), max_queue=3)
    t.log_metrics({"loss": 0.0}, step=0)
    assert client.entered.wait(30)  # the thread took step 0 and waits on the server
    for step in range(1, 6):
        t.log_metrics({"loss": float(step)}, step=step)
    assert t.dropped == 2
    client.gate.set()
    assert t.flush(timeout=10)
    t.close()
    assert [s for c in client.calls for _, _, s in c[2]] == [0, 3, 4, 5]


def test_background_tracker_close_reports_an_outage(caplog, monkeypatch):
    from aov_dist.tracking.mlflow_tracker import BackgroundTracker

    monkeypatch.setattr(logging.getLogger("aov_dist.tracking.mlflow_tracker"), "disabled", False)
    client = _FlakyClient()
    client.down = True
    t = BackgroundTracker(MlflowTracker("http://unused", "run-1", client=client, retry_after_s=3600.0))
    for step in range(3):
        t.log_metrics({"loss": float(step)}, step=step)
    t.close()
    assert "training continues" in caplog.text and "could not be sent" in caplog.text
    assert client.calls == []
    with pytest.raises(RuntimeError, match="after close"):
        t.log_metrics({"loss": 1.0}, step=9)


def test_each_nodes_system_metrics_carry_the_node_and_a_cpu_node_logs_no_gpu_and_no_warning(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.system_metrics import start_node_monitor, stop_node_monitor

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="sys", system_metrics=True)
    run_id = create_run(cfg, "job", {}, "")
    with caplog.at_level(logging.WARNING):
        monitors = [start_node_monitor(cfg, run_id, node_rank=r, nodes=2) for r in (0, 1)]
        for m in monitors:
            m.publish_metrics(m.collect_metrics() and m.aggregate_metrics())  # one sample now, not in 10 s
        for m in monitors:
            stop_node_monitor(m)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    keys = set(MlflowClient(cfg.uri).get_run(run_id).data.metrics)
    for node in ("node_0", "node_1"):
        assert f"system/{node}/cpu_utilization_percentage" in keys
    assert not [k for k in keys if "gpu" in k]  # no GPU here: MLflow skips that monitor quietly
    one_node = start_node_monitor(cfg, run_id, node_rank=0, nodes=1)
    assert one_node.node_id is None  # a one-node job keeps MLflow's plain names
    stop_node_monitor(one_node)
    assert start_node_monitor(TrackingConfig(system_metrics=False), run_id, 0, 1) is None


def test_pruning_keeps_checkpoints_the_watcher_has_not_scored_and_the_best_one(tmp_path):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.mlflow_tracker import CHECKPOINT_TAG, EVAL_TAG, steps_to_keep

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="keep", system_metrics=False)
    run_id = create_run(cfg, "job", {}, "")
    client = MlflowClient(cfg.uri)
    for step in (2, 4, 6, 8):
        client.set_tag(run_id, f"{CHECKPOINT_TAG}{step}", f"/runs/job/step_{step}")
    client.set_tag(run_id, f"{EVAL_TAG}2", "done:abc")
    client.set_tag(run_id, f"{EVAL_TAG}4", "done:def")
    client.set_tag(run_id, f"{EVAL_TAG}6", "running:1:ghi")  # under way: not scored yet
    for step, f1, loss in ((2, 0.5, 0.9), (4, 0.8, 0.4), (6, 0.7, 0.6)):
        client.log_metric(run_id, "eval/detection/class_mean/f1", f1, step=step)
        client.log_metric(run_id, "eval/loss", loss, step=step)
    assert steps_to_keep(cfg, run_id, unevaluated=True, best=None) == {6, 8}
    assert steps_to_keep(cfg, run_id, unevaluated=False, best="eval/detection/class_mean/f1") == {4}
    assert steps_to_keep(cfg, run_id, unevaluated=False, best="eval/loss") == {4}  # lower is better
    assert steps_to_keep(cfg, run_id, unevaluated=True, best="eval/detection/class_mean/f1") == {4, 6, 8}
    assert steps_to_keep(cfg, None, unevaluated=True, best=None) == set()  # untracked job: nothing extra
