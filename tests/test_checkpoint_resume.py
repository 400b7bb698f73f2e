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
    ("cluster", {"workers_per_node": 4}, "cluster.nodes"),
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
