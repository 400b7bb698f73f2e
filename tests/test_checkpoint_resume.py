"""Resuming a checkpoint: what must match the job that wrote it (named before anything starts),
and what each rank reads from remote storage (only the files it loads)."""
from __future__ import annotations

import dataclasses

import pytest

from aov_dist.config import ConfigError
from aov_dist.train import checkpoint as ckpt
from train_harness import job_cfg, run_ranks, save_checkpoint, tiny_overrides, typed_cfg


def _changed(cfg, **sections):
    """A copy of ``cfg`` with e.g. stage={"name": "stage2"} replaced."""
    out = dataclasses.replace(cfg)
    for section, values in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **values))
    return out


@pytest.mark.parametrize("section, values, key", [
    ("stage", {"name": "stage2"}, "stage.name"),
    ("model", {"preset": "aov_0.5b"}, "model.preset"),
    ("deepspeed", {"zero_stage": 2}, "deepspeed.zero_stage"),
    ("stage", {"global_batch_size": 256}, "stage.global_batch_size"),
    ("data", {"micro_batch_size": 4}, "data.micro_batch_size"),
])
def test_resuming_with_what_the_checkpoint_cannot_continue_names_the_key(tmp_path, section, values, key):
    cfg = job_cfg(str(tmp_path))
    cfg.cluster.workers_per_node = 1  # save_checkpoint writes as rank 0 of 1
    step = save_checkpoint(cfg, 2)
    ckpt.check_resume(cfg, step)  # the job that wrote it continues it
    with pytest.raises(ConfigError) as err:
        ckpt.check_resume(_changed(cfg, **{section: values}), step)
    assert err.value.key == key and str(err.value).startswith(f"{key}: ")
    assert "step_2" in str(err.value)


def test_another_number_of_workers_resumes_a_zero3_checkpoint_and_is_named_for_zero2(tmp_path):
    for zero in (3, 2):
        cfg = job_cfg(str(tmp_path / f"z{zero}"))
        cfg.cluster.workers_per_node, cfg.deepspeed.zero_stage = 1, zero
        step = save_checkpoint(cfg, 2)
        more = _changed(cfg, cluster={"workers_per_node": 4})
        if zero == 3:
            ckpt.check_resume(more, step)  # resharded on load
            continue
        with pytest.raises(ConfigError, match=r"^cluster.nodes: .*step_2 was written by 1 workers and this job "
                                              r"has 4 .*resume on 1 workers"):
            ckpt.check_resume(more, step)


def test_the_driver_names_a_resume_mismatch_before_starting_anything(tmp_path, synthetic_shards):
    from aov_dist.train.driver import main
    from train_harness import compose_cfg

    cfg = job_cfg(str(tmp_path / "runs"))
    save_checkpoint(cfg, 2)
    db = tmp_path / "mlflow.db"
    job = compose_cfg([f"data.datasets.0.manifest={synthetic_shards.manifest_path}", f"train.storage_path={tmp_path}/runs",
                       "train.run_name=run", "stage.global_batch_size=8", f"tracking.uri=sqlite:///{db}"])
    with pytest.raises(ConfigError, match=r"^stage.global_batch_size: 8, but .*step_2 was written with "
                                          r"stage.global_batch_size=128"):
        main(job, show_progress=False)
    assert not db.exists()


@pytest.mark.slow
def test_each_rank_downloads_only_its_own_share_when_resuming_from_s3(synthetic_shards, s3_bucket, tmp_path):
    from aov_dist import storage

    common = dict(world=2, num_workers=0, global_batch=4, micro=2, run_name="share")
    first = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, f"{s3_bucket}/runs", steps=2,
                                     extra=["train.export_hf_in_checkpoints=false"], **common))
    run_ranks(first, tmp_path / "a", deadline_s=600)
    state = f"{s3_bucket}/runs/share/step_2/ds/state"
    sizes = {name: storage.size(f"{state}/{name}") for name in storage.list_names(state)}
    per_rank = [sum(v for k, v in sizes.items() if f"zero_pp_rank_{r}_" in k) for r in (0, 1)]
    second = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, f"{s3_bucket}/runs", steps=3,
                                      extra=["train.export_hf_in_checkpoints=false"], **common))
    ranks = run_ranks(second, tmp_path / "b", deadline_s=600)
    assert [r["resumed_from"] for r in ranks] == [f"{s3_bucket}/runs/share/step_2"] * 2
    assert [r["restored_bytes"] for r in ranks] == per_rank  # its own partitions, nothing else
    assert all(0 < b < sum(sizes.values()) for b in per_rank)
    # on one worker the same checkpoint resumes resharded (the whole ds/ folder downloaded once,
    # converted on this machine) and step 3 trains as on the two workers that wrote it
    one = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, f"{s3_bucket}/runs", steps=3,
                                   **{**common, "world": 1, "run_name": "share-on-one"},
                                   extra=["train.export_hf_in_checkpoints=false",
                                          f"train.resume_from='{s3_bucket}/runs/share/step_2'"]))
    [alone] = run_ranks(one, tmp_path / "c", deadline_s=600)
    assert alone["resumed_from"] == f"{s3_bucket}/runs/share/step_2"
    assert alone["losses"] == pytest.approx(ranks[0]["losses"], rel=1e-5)


def _slow_then_killed_upload(cfg, rank: int, world: int, kill_step: int) -> dict:
    """Step 2's upload takes 3 s (training goes on meanwhile); the upload of ``kill_step`` kills
    the process half-way, as a preempted node would."""
    import os
    import time

    from aov_dist.train import checkpointing
    from aov_dist.train.loop import run_training

    real = checkpointing.upload_part

    def upload(local, final, r):
        if final.endswith(f"step_{kill_step}"):
            checkpointing.storage.write_bytes(f"{final}/partial", b"half")  # something reached storage
            os._exit(17)
        time.sleep(3.0)
        real(local, final, r)

    checkpointing.upload_part = upload
    steps_seen: list[int] = []
    commits: list[tuple[int, int]] = []
    result = run_training(cfg, rank, world, on_step=lambda m: steps_seen.append(m["step"]),
                          on_checkpoint=lambda step, path, m: commits.append((step, len(steps_seen))))
    return {"losses": result.losses, "commits": commits}


def _commit_points(cfg, rank: int, world: int) -> dict:
    from aov_dist.train.loop import run_training

    steps_seen: list[int] = []
    commits: list[tuple[int, int]] = []
    result = run_training(cfg, rank, world, on_step=lambda m: steps_seen.append(m["step"]),
                          on_checkpoint=lambda step, path, m: commits.append((step, len(steps_seen))))
    return {"losses": result.losses, "commits": commits, "resumed_from": result.resumed_from}


@pytest.mark.slow
def test_a_kill_during_the_background_upload_resumes_from_the_previous_commit_with_the_same_losses(
        synthetic_shards, s3_bucket, tmp_path):
    from functools import partial

    from aov_dist import storage

    def job(run: str):
        return typed_cfg(tiny_overrides(synthetic_shards.manifest_path, f"{s3_bucket}/runs", world=2, num_workers=0,
                                        steps=6, global_batch=4, micro=2, run_name=run,
                                        extra=["train.checkpoint_every_steps=2", "train.keep_checkpoints=3"]))

    whole = run_ranks(job("whole"), tmp_path / "whole", rank_fn=_commit_points, deadline_s=600)
    # uninterrupted and on S3: step 2's checkpoint commits while later steps train (rank 0's view)
    assert [s for s, _ in whole[0]["commits"]] == [2, 4, 6]
    err = run_ranks(job("killed"), tmp_path / "killed", rank_fn=partial(_slow_then_killed_upload, kill_step=4),
                    deadline_s=600, expect_error=True)
    assert "exit code 17" in str(err) or "exited with exit code 17" in str(err), err
    assert storage.exists(f"{s3_bucket}/runs/killed/step_4/partial")  # half-written, never committed
    assert ckpt.latest_committed(f"{s3_bucket}/runs", "killed") == f"{s3_bucket}/runs/killed/step_2"
    resumed = run_ranks(job("killed"), tmp_path / "resumed", rank_fn=_commit_points, deadline_s=600)
    assert resumed[0]["resumed_from"] == f"{s3_bucket}/runs/killed/step_2"
    assert resumed[0]["losses"] == pytest.approx(whole[0]["losses"], rel=1e-6)


@pytest.mark.slow
def test_training_goes_on_while_a_checkpoint_uploads(synthetic_shards, s3_bucket, tmp_path):
    from functools import partial

    cfg = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, f"{s3_bucket}/runs", world=2, num_workers=0,
                                   steps=5, global_batch=4, micro=2, run_name="async",
                                   extra=["train.checkpoint_every_steps=2", "train.keep_checkpoints=3"]))
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=partial(_slow_then_killed_upload, kill_step=99), deadline_s=600)
    commits = dict(ranks[0]["commits"])
    assert sorted(commits) == [2, 4, 5]
    assert commits[2] > 2  # step 2's 3-second upload did not stop training: it committed after step 3 or later
