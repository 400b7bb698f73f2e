"""End to end on this machine: Hydra config -> driver -> real Ray Train (2 CPU workers, gloo) ->
real DeepSpeed ZeRO-3 -> committed checkpoints -> real MLflow (sqlite) with checkpoint tags and a
registered model; then a recreated job with the same run name continues from our own discovery."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _job(tmp_path, manifest, steps: int):
    from train_harness import compose_cfg

    overrides = [
        f"data.datasets=[{{name: s, manifest: '{manifest}', weight: 1.0}}]",
        "data.num_workers=0", "data.micro_batch_size=2", "stage.global_batch_size=4",
        f"stage.max_steps={steps}", "train.checkpoint_every_steps=2", "train.keep_checkpoints=2",
        "deepspeed.param_persistence_threshold=0", "cluster.workers_per_node=2",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=e2e",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_location={tmp_path / 'art'}",
        "tracking.experiment=aov-e2e", "tracking.registered_model_name=aov-e2e", "tracking.system_metrics=false",
    ]
    return compose_cfg(overrides)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _expert_logits(hf_dir: str, image_paths: list[str]) -> torch.Tensor:
    from PIL import Image

    from aov_dist.model import ModelConfig, build_model

    model, processor = build_model(ModelConfig(pretrained_path=hf_dir))
    model.eval()
    enc = [processor.encode_images([Image.open(p).convert("RGB")]) for p in image_paths]
    with torch.no_grad():
        return model.expert_forward(torch.cat([e.pixel_values for e in enc]),
                                    torch.cat([e.image_grids for e in enc])).logits


def test_ray_job_mlflow_and_resume(tmp_path, synthetic_shards, ray_session):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.run_info import git_info, manifest_digest
    from aov_dist.train import checkpoint as ckpt
    from aov_dist.train.driver import main
    from aov_dist.train.export import cli as export_cli

    manifest = synthetic_shards.manifest_path
    first = main(_job(tmp_path, manifest, steps=3), show_progress=False)
    run_dir = f"{tmp_path / 'runs'}/e2e"
    assert first.run_dir == run_dir and first.resumed_from is None
    assert len(first.losses) == 3 and all(0 < x < 5 for x in first.losses)
    assert first.latest_checkpoint == f"{run_dir}/step_3"
    assert [s for s, _, ok in ckpt.list_steps(str(tmp_path / "runs"), "e2e") if ok] == [2, 3]
    marker = json.loads(open(f"{run_dir}/step_3/COMMITTED").read())
    assert marker["step"] == 3 and marker["world_size"] == 2
    assert sorted(os.listdir(f"{run_dir}/step_3/loader")) == ["rank_0.json", "rank_1.json"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aov-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]  # one run for the job, not one per worker
    run = runs[0]
    assert run.info.status == "FINISHED"
    # what the runs table compares: name, flat params, the data read, the source version
    assert run.info.run_name == "tiny/stage1/e2e"
    params = run.data.params
    assert params["stage.name"] == "stage1" and params["deepspeed.zero_stage"] == "3"
    assert params["cluster.workers"] == "2" and params["stage.global_batch_size"] == "4"
    assert params["data.datasets"] == "s:1"
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("s", manifest_digest(synthetic_shards.manifest))
    assert json.loads(inp.dataset.profile)["num_samples"] == synthetic_shards.manifest["totals"]["samples"]
    assert json.loads(inp.dataset.source)["uri"] == str(manifest)
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]
    assert run.data.tags["mlflow.source.git.commit"] == git_info()["commit"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(first.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(first.losses)
    for key in ("lr/expert", "samples_per_s", "grad_norm"):
        assert len(client.get_metric_history(first.run_id, key)) == 3, key
    assert "mfu" not in run.data.metrics  # CPU: no MFU
    tags = run.data.tags
    assert tags["aov.checkpoint.2"] == f"{run_dir}/step_2" and tags["aov.checkpoint.3"] == f"{run_dir}/step_3"
    assert "config.yaml" in [a.path for a in client.list_artifacts(first.run_id)]

    # the registered model is the final export and gives the logits of the trained weights
    assert first.registered_model == "models:/aov-e2e/1"
    version = client.get_model_version("aov-e2e", "1")
    assert version.run_id == first.run_id
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri="models:/aov-e2e/1", dst_path=str(tmp_path / "reg"))
    hf_reg = os.path.join(model_dir, "artifacts", "hf")
    images = [str(p) for p in sorted(synthetic_shards.data.benchmark_dir.rglob("*.png"))[:3]]
    in_ckpt = _expert_logits(f"{run_dir}/step_3/hf", images)
    torch.testing.assert_close(_expert_logits(hf_reg, images), in_ckpt, rtol=0, atol=0)
    # the rank-0 export written during training equals a merge of every rank's ZeRO shards
    export_cli([run_dir, str(tmp_path / "merged"), "--from-shards"])  # aov-export on the run folder
    torch.testing.assert_close(_expert_logits(str(tmp_path / "merged"), images), in_ckpt, rtol=1e-6, atol=1e-6)

    # A recreated job with the same run name continues from step 3 (our discovery, not Ray's).
    second = main(_job(tmp_path, manifest, steps=5), show_progress=False)
    assert second.resumed_from == f"{run_dir}/step_3"
    assert len(second.losses) == 5 and second.losses[:3] == first.losses
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and second.run_id != first.run_id
    assert [m.step for m in client.get_metric_history(second.run_id, "loss")] == [4, 5]
    assert [s for s, _, ok in ckpt.list_steps(str(tmp_path / "runs"), "e2e") if ok] == [4, 5]  # keep 2
