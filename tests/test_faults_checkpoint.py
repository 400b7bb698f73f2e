"""Crash during a checkpoint write: a half-written step folder is never loaded, and old checkpoints
are deleted only after a newer one is committed.

The fast tests drive ``checkpointing.CheckpointWriter`` (the real commit/prune code) with stand-ins for the DeepSpeed
engine (``train_harness.save_checkpoint``), so a failure can be planted at any file-system call;
the slow one crashes a real 1-rank ZeRO-3 run while it writes step 4 and resumes it.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Optional

import pytest

from aov_dist.train import checkpoint as ckpt
from train_harness import FakeModule, compose_cfg, job_cfg, run_ranks, save_checkpoint, tiny_overrides, typed_cfg


def test_failed_save_leaves_no_marker_and_keeps_the_last_committed(tmp_path):
    cfg = job_cfg(str(tmp_path), keep=1)
    step = [2]
    module = FakeModule(fail_on_step=4, step_ref=step)
    assert save_checkpoint(cfg, 2, module) == f"{tmp_path}/run/step_2"
    step[0] = 4
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(cfg, 4, module)
    # the half-written folder exists, without its marker; keep=1 did not delete step 2
    assert (tmp_path / "run/step_4/hf/model.safetensors").exists()
    assert not (tmp_path / "run/step_4" / ckpt.COMMIT_MARKER).exists()
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(tmp_path), "run")] == [(2, True), (4, False)]
    assert ckpt.latest_committed(str(tmp_path), "run") == f"{tmp_path}/run/step_2"
    # the next successful save commits, then prunes step 2 and the leftover step 4
    step[0] = 6
    save_checkpoint(cfg, 6, module)
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(tmp_path), "run")] == [(6, True)]


def test_marker_write_failure_leaves_step_uncommitted(tmp_path, monkeypatch):
    cfg = job_cfg(str(tmp_path), keep=1)
    save_checkpoint(cfg, 2)
    real = ckpt.write_marker

    def failing_marker(path, step, world):
        if step == 4:
            raise OSError("I/O error while writing the marker")
        real(path, step, world)

    monkeypatch.setattr(ckpt, "write_marker", failing_marker)
    pruned = []
    monkeypatch.setattr(ckpt, "prune", lambda *a, **k: pruned.append(a))
    with pytest.raises(OSError, match="marker"):
        save_checkpoint(cfg, 4)
    assert pruned == []  # never pruned without a newer commit
    assert ckpt.latest_committed(str(tmp_path), "run") == f"{tmp_path}/run/step_2"
    assert (tmp_path / "run/step_4/trainer_state.json").exists()


def test_resume_from_an_uncommitted_folder_is_refused(tmp_path, synthetic_shards):
    from aov_dist.config import ConfigError

    cfg = job_cfg(str(tmp_path))
    save_checkpoint(cfg, 2)
    os.makedirs(tmp_path / "run/step_4/ds")
    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path, run_name="run",
                        extra=[f"train.resume_from={tmp_path}/run/step_4"])
    from aov_dist.config import validate

    with pytest.raises(ConfigError, match=r"train.resume_from: .*step_4.* is not a committed checkpoint"):
        validate(compose_cfg(ov))


# ---- a real crash while writing step 4, then resume (1 gloo rank, ZeRO-3) ----


def crashing_rank(cfg, rank: int, world: int, crash_step: Optional[int]) -> dict:
    """One rank of run_training whose save of step ``crash_step`` fails after every file but the
    commit marker is written (a crash at that point). Returns the loss of every step run and
    either the LoopResult's losses and resume source or the error (reported, not raised)."""
    from aov_dist.train import checkpoint as ck
    from aov_dist.train.loop import run_training

    real = ck.write_marker

    def marker(path, step, world):  # the process dies after every file but the marker is written
        if step == crash_step:
            raise OSError("simulated crash before the commit marker")
        real(path, step, world)

    ck.write_marker = marker
    steps: list[float] = []
    record = {"losses": steps}
    try:
        r = run_training(cfg, rank, world, on_step=lambda m: steps.append(m["loss"]))
        record.update(result=r.losses, resumed_from=r.resumed_from)
    except OSError as e:
        record["error"] = str(e)
    return record


def _run(overrides: list[str], out: Path, crash_step: Optional[int]) -> dict:
    (record,) = run_ranks(typed_cfg(overrides), out, rank_fn=partial(crashing_rank, crash_step=crash_step))
    return record


@pytest.mark.slow
def test_crash_while_writing_step4_resumes_from_step2_with_the_same_losses(tmp_path, synthetic_shards):
    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=1, num_workers=0, steps=4,
                        global_batch=2, micro=2, run_name="crash",
                        extra=["train.checkpoint_every_steps=2", "train.keep_checkpoints=1"])
    crashed = _run(ov, tmp_path / "a", crash_step=4)
    assert "simulated crash" in crashed["error"] and len(crashed["losses"]) == 4
    root = str(tmp_path / "runs")
    assert [(s, ok) for s, _, ok in ckpt.list_steps(root, "crash")] == [(2, True), (4, False)]

    resumed = _run(ov, tmp_path / "b", crash_step=None)
    assert resumed["resumed_from"] == f"{root}/crash/step_2"  # never the half-written step 4
    # steps 3 and 4 again, from the step-2 state: exactly the losses of the crashed run
    assert resumed["result"] == pytest.approx(crashed["losses"], rel=1e-6, abs=1e-7)
    assert [(s, ok) for s, _, ok in ckpt.list_steps(root, "crash")] == [(4, True)]
    assert json.loads((tmp_path / "runs/crash/step_4/trainer_state.json").read_text())["step"] == 4
