"""MLflow down: an unreachable tracking server never stops or stalls training; metrics are dropped
with a warning; checkpoints still commit."""
from __future__ import annotations

import logging
import time
from functools import partial

import pytest

from aov_dist.tracking.mlflow_tracker import HTTP_RETRY_ENV, MlflowTracker
from train_harness import free_port, run_ranks, tiny_overrides, train_rank, typed_cfg


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed


def test_dead_server_costs_seconds_not_minutes(monkeypatch, caplog):
    import urllib3.util.connection

    for key in HTTP_RETRY_ENV:  # the tracker's own bounded retries, not a developer's settings
        monkeypatch.delenv(key, raising=False)
    caplog.set_level(logging.WARNING)
    uri = _dead_uri()
    port = int(uri.rsplit(":", 1)[1])
    attempts = []  # connection attempts to the dead server (MLflow's HTTP client goes through urllib3)
    real_connect = urllib3.util.connection.create_connection

    def counting_connect(address, *args, **kwargs):
        if address[1] == port:
            attempts.append(address)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting_connect)
    tracker = MlflowTracker(uri, "0" * 32, retry_after_s=30.0)
    t0 = time.monotonic()
    tracker.log_metrics({"loss": 1.0}, step=1)
    first = time.monotonic() - t0
    # MLflow's defaults retry 7 times with backoff (8 attempts: measured 246 s for this one call);
    # the tracker's settings bound it to 1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES attempts
    assert len(attempts) == 1 + int(HTTP_RETRY_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), attempts
    assert first < 60, first  # a generous failsafe only (about 3 s here): the attempts above are the check
    for step in range(2, 6):  # the server is left alone for retry_after_s: no network at all
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert len(attempts) == 1 + int(HTTP_RETRY_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), attempts
    assert len(tracker.pending) == 5 and tracker.failures == 1
    assert "training continues" in caplog.text


def train_rank_keeping_warnings(cfg, rank: int, world: int, **kwargs) -> dict:
    """``train_rank`` plus every warning the package logged during the run."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("aov_dist").addHandler(Keep(level=logging.WARNING))
    return {**train_rank(cfg, rank, world, **kwargs), "warnings": records}


@pytest.mark.slow
def test_training_with_the_server_down_commits_its_checkpoints(tmp_path, synthetic_shards):
    from aov_dist.train import checkpoint as ckpt

    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=1, num_workers=0, steps=3,
                        global_batch=2, micro=2, run_name="nomlflow", tracking=True,
                        extra=[f"tracking.uri={_dead_uri()}", "train.checkpoint_every_steps=1",
                               "tracking.close_wait_s=0"])
    (r,) = run_ranks(typed_cfg(ov), tmp_path / "out", rank_fn=partial(train_rank_keeping_warnings, run_id="0" * 32))
    assert len(r["losses"]) == 3
    assert [s for s, _, ok in ckpt.list_steps(str(tmp_path / "runs"), "nomlflow") if ok] == [2, 3]
    assert any("training continues" in w for w in r["warnings"]), r["warnings"]
    assert any("could not be sent" in w for w in r["warnings"]), r["warnings"]
