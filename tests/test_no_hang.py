"""No hangs: a stalled rank ends the job with a named error within a bound (2 gloo ranks, tiny
model, ZeRO-3, real DeepSpeed, no Ray). Each case runs under run_ranks' deadline, so a watchdog
that does not fire fails the test by timeout instead of hanging the suite.

The modality mixes that used to hang (a text-only micro-batch on one rank beside images on the
other, samples too long only after image expansion, packed or not) are in
tests/test_faults_stage2_data.py; a killed worker resumed under Ray in tests/test_faults_worker_kill.py.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from train_harness import run_ranks, tracked_epoch_overrides, train_rank, typed_cfg

pytestmark = pytest.mark.slow
LIMIT_S = 20  # train.step_timeout_s of these jobs
BOUND_S = 240  # spawn + build + 2 steps + the limit + the report, with room for a loaded CI machine
STALL_AT = 2  # the micro-batch call (1-based) of the stalled rank that stalls


def _job(tmp_path: Path, synthetic_shards, run: str):
    cfg = typed_cfg(tracked_epoch_overrides(synthetic_shards.manifest_path, tmp_path, run,
                                            extra=[f"train.step_timeout_s={LIMIT_S}"]))
    from aov_dist.tracking.mlflow_tracker import create_run

    return cfg, create_run(cfg.tracking, run, {}, "")


def _stall_reports(cfg, run_id) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    names = [a.path for a in client.list_artifacts(run_id, "stalls")]
    return {Path(n).name: Path(client.download_artifacts(run_id, n)).read_text() for n in names}


# --------------------------------------------------------------- rank functions
def _loader_stall_rank(cfg, rank: int, world: int, run_id: str, stalled: int) -> dict:
    """Rank ``stalled`` sleeps inside its loader (the collate of its STALL_AT-th micro-batch)."""
    from aov_dist.train.tasks import make_task

    task = make_task(cfg.stage.name)
    build = task.build_loader

    def build_loader(*args):
        loader = build(*args)
        collate, calls = loader.collate, [0]

        def stalling(items):
            calls[0] += 1
            if rank == stalled and calls[0] == STALL_AT:
                time.sleep(3600)
            return collate(items)

        loader.collate = stalling
        return loader

    task.build_loader = build_loader
    return train_rank(cfg, rank, world, run_id=run_id, task=task)


def _sigstop_rank(cfg, rank: int, world: int, run_id: str, stopped: int, pid_file: str) -> dict:
    """Rank ``stopped`` stops itself (SIGSTOP: alive, silent, its watchdog frozen with it) in its
    STALL_AT-th forward; the test kills it once the other rank has given up."""
    from aov_dist.train.tasks import make_task

    task = make_task(cfg.stage.name)
    loss, calls = task.loss, [0]

    def stopping(strategy, batch):
        calls[0] += 1
        if rank == stopped and calls[0] == STALL_AT:
            Path(pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return loss(strategy, batch)

    task.loss = stopping
    return train_rank(cfg, rank, world, run_id=run_id, task=task)


def _save_stall_rank(cfg, rank: int, world: int, run_id: str, stalled: int) -> dict:
    """Rank ``stalled`` hangs while writing its part of the first checkpoint."""
    from aov_dist.train.strategy import DeepSpeedStrategy

    class StallingSave(DeepSpeedStrategy):
        def save(self, path):
            if rank == stalled:
                time.sleep(3600)
            return super().save(path)

    return train_rank(cfg, rank, world, run_id=run_id, strategy=StallingSave(cfg))


# ------------------------------------------------------------------------ cases
def _fails_within_bound(cfg, out: Path, rank_fn) -> float:
    t0 = time.monotonic()
    err = run_ranks(cfg, out, rank_fn=rank_fn, deadline_s=BOUND_S, expect_error=True)
    assert err is not None
    return time.monotonic() - t0


def test_a_stalled_loader_ends_the_job_with_a_stall_report_within_the_limit(tmp_path, synthetic_shards):
    cfg, run_id = _job(tmp_path, synthetic_shards, "loader-stall")
    _fails_within_bound(cfg, tmp_path / "out", partial(_loader_stall_rank, run_id=run_id, stalled=1))
    reports = _stall_reports(cfg, run_id)
    stalled = [text for name, text in reports.items() if name.startswith("rank_1_")]
    assert stalled, sorted(reports)
    assert stalled[0].startswith("WorkerStalled: rank 1 made no progress for")
    assert f"(limit {LIMIT_S} s)" in stalled[0] and "while: step 2: reading micro-batch 1" in stalled[0]
    assert "time.sleep(3600)" in stalled[0]  # the stack shows where it waits


def test_a_stopped_rank_is_named_by_the_rank_waiting_for_it(tmp_path, synthetic_shards):
    cfg, run_id = _job(tmp_path, synthetic_shards, "sigstop")
    pid_file = tmp_path / "stopped.pid"

    def kill_the_stopped_rank_once_the_other_gave_up():
        # Ray would SIGKILL the whole group; spawn's clean-up cannot end a stopped process
        end = time.monotonic() + BOUND_S
        while time.monotonic() < end and not (pid_file.exists() and _stall_reports(cfg, run_id)):
            time.sleep(1)
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_stopped_rank_once_the_other_gave_up, daemon=True)
    killer.start()
    _fails_within_bound(cfg, tmp_path / "out", partial(_sigstop_rank, run_id=run_id, stopped=1,
                                                       pid_file=str(pid_file)))
    killer.join(timeout=30)
    reports = _stall_reports(cfg, run_id)
    assert list(reports) and all(name.startswith("rank_0_") for name in reports), sorted(reports)
    text = next(iter(reports.values()))
    assert text.startswith("WorkerStalled: rank 0 made no progress") and "while: step 2: " in text


def test_a_stall_inside_the_checkpoint_write_ends_the_job_with_a_stall_report(tmp_path, synthetic_shards):
    cfg, run_id = _job(tmp_path, synthetic_shards, "save-stall")
    cfg.train.checkpoint_every_steps = 1
    _fails_within_bound(cfg, tmp_path / "out", partial(_save_stall_rank, run_id=run_id, stalled=1))
    reports = _stall_reports(cfg, run_id)
    # both ranks are inside the save (one writing, one at its barrier): whichever fires first names it
    assert reports and all("while: step 1: checkpoint save" in text for text in reports.values()), reports


def _multi_image_on_one_rank_only(cfg) -> int:
    """Steps in which one rank's micro-batch holds a multi-image sample and the other's does not
    (the two ranks' loaders rebuilt here: deterministic plans, exactly what the ranks read)."""
    from aov_dist.model.presets import tiny_processor
    from aov_dist.train.tasks import make_task

    task, processor = make_task("stage2"), tiny_processor()

    def multi(batch) -> bool:  # the images of a multi-image sample are single views: grid (0, 0)
        return bool((batch["image_grids"] == 0).all(dim=1).any())

    per_rank = [[multi(b) for b in task.build_loader(cfg, processor, r, 2)][:cfg.stage.max_steps] for r in range(2)]
    return sum(1 for a, b in zip(*per_rank) if a != b)


def test_a_multi_image_sample_on_one_rank_only_trains_like_one_rank_with_accumulation(tmp_path, synthetic_shards):
    from train_harness import tiny_overrides

    def cfg(world: int):
        return typed_cfg(tiny_overrides(synthetic_shards.manifest_path, tmp_path / f"w{world}", world=world,
                                        num_workers=0, steps=6, global_batch=4, micro=2, run_name=f"multi{world}",
                                        extra=["stage=stage2", "stage.require_init=false", "data.max_length=1024",
                                               "train.checkpoint_every_steps=100", f"train.step_timeout_s={LIMIT_S}"]))

    two = cfg(2)
    assert _multi_image_on_one_rank_only(two) >= 1  # the premise: ranks with different modality mixes
    ranks = run_ranks(two, tmp_path / "out2", deadline_s=BOUND_S)
    (one,) = run_ranks(cfg(1), tmp_path / "out1", deadline_s=BOUND_S)
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-4) and len(one["losses"]) == 6
