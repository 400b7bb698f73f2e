"""MLflow down: an unreachable tracking server never stops or stalls training; metrics are dropped
with a warning; checkpoints still commit."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from aov_dist.tracking.mlflow_tracker import HTTP_RETRY_ENV, MlflowTracker
from train_harness import free_port as _free_port


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def test_dead_server_costs_seconds_not_minutes(monkeypatch, caplog):
    for key in HTTP_RETRY_ENV:  # the tracker's own bounded retries, not a developer's settings
        monkeypatch.delenv(key, raising=False)
    caplog.set_level(logging.WARNING)
    tracker = MlflowTracker(_dead_uri(), "0" * 32, retry_after_s=30.0)
    t0 = time.monotonic()
    tracker.log_metrics({"loss": 1.0}, step=1)
    first = time.monotonic() - t0
    # MLflow's defaults retry 7 times with backoff: measured 246 s for this one call
    assert first < 20, first
    t0 = time.monotonic()
    for step in range(2, 6):  # the server is left alone for retry_after_s: no network at all
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert time.monotonic() - t0 < 0.5
    assert len(tracker.pending) == 5 and tracker.failures == 1
    assert "training continues" in caplog.text


def _rank(rank: int, port: int, container: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from aov_dist.config import to_typed
    from aov_dist.train.loop import run_training

    torch.set_num_threads(1)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("aov_dist").addHandler(Keep(level=logging.WARNING))
    dist.init_process_group("gloo", rank=0, world_size=1)
    t0 = time.monotonic()
    r = run_training(to_typed(container), 0, 1, run_id="0" * 32)
    Path(out).write_text(json.dumps({"losses": r.losses, "checkpoints": r.checkpoints, "warnings": records,
                                     "seconds": time.monotonic() - t0}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_training_with_the_server_down_commits_its_checkpoints(tmp_path, synthetic_shards):
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    from aov_dist.train import checkpoint as ckpt
    from train_harness import tiny_overrides, typed_cfg

    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=1, num_workers=0, steps=3,
                        global_batch=2, micro=2, run_name="nomlflow", tracking=True,
                        extra=[f"tracking.uri={_dead_uri()}", "train.checkpoint_every_steps=1"])
    c = typed_cfg(ov)
    container = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    mp.spawn(_rank, args=(_free_port(), container, str(tmp_path / "r.json")), nprocs=1, join=True)
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["losses"]) == 3
    assert [s for s, _, ok in ckpt.list_steps(str(tmp_path / "runs"), "nomlflow") if ok] == [2, 3]
    assert any("training continues" in w for w in r["warnings"]), r["warnings"]
    assert any("could not be sent" in w for w in r["warnings"]), r["warnings"]
