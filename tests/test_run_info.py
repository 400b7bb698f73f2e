"""What a run says about itself in MLflow: compared params, source version, dataset inputs."""
from __future__ import annotations

import json
import logging
import subprocess
from types import SimpleNamespace

from omegaconf import OmegaConf

from aov_dist.tracking import run_info


def test_compared_params_of_the_default_job_are_the_listed_keys_and_nothing_else():
    from aov_dist.config import TrainJobConfig

    c = OmegaConf.to_container(OmegaConf.structured(TrainJobConfig()))
    c["stage"]["lr"] = {"projector": 1e-3, "expert": 2e-4}
    c["data"]["datasets"] = [{"name": "instruct", "manifest": "s3://b/m.json", "weight": 3.0},
                             {"name": "extra", "manifest": "/d/m.json", "weight": 0.5}]
    assert run_info.compared_params(c) == {
        "model.preset": "tiny", "stage.name": "stage1", "stage.global_batch_size": "128", "stage.max_steps": "-1",
        "stage.epochs": "2.0", "stage.init_from": "None", "data.micro_batch_size": "2", "data.max_length": "2048",
        "data.packing": "False", "deepspeed.zero_stage": "3", "deepspeed.precision": "auto", "cluster.name": "local",
        "cluster.nodes": "1", "train.seed": "0", "stage.lr.expert": "0.0002", "stage.lr.projector": "0.001",
        "cluster.workers": "2", "data.datasets": "instruct:3,extra:0.5"}
    assert run_info.run_display_name("aov_7b", "stage2", "sweep-lr3") == "aov_7b/stage2/sweep-lr3"
    assert (run_info.training_runs_url("http://127.0.0.1:5000/", "7")
            == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_source_tags_name_the_commit_branch_and_a_repo_url_without_credentials(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "trunk")
    (repo / "f.txt").write_text("a")
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "one")
    _git(repo, "remote", "add", "origin", "https://user:s3cr3t@git.example.com/aov/aov-dist.git")
    head = _git(repo, "rev-parse", "HEAD")
    assert run_info.git_info(str(repo), environ={}) == {
        "commit": head, "dirty": "false", "branch": "trunk", "repo": "https://git.example.com/aov/aov-dist.git"}
    (repo / "f.txt").write_text("b")
    assert run_info.git_info(str(repo), environ={})["dirty"] == "true"
    # a Ray job's working directory has no .git: the submitter's values win
    env = {"AOV_GIT_COMMIT": "c0ffee", "AOV_GIT_DIRTY": "false", "AOV_USER": "alice"}
    tags = run_info.source_tags("aov_dist.train", environ=env)
    assert tags == {"mlflow.source.type": "JOB", "mlflow.source.name": "aov_dist.train", "mlflow.user": "alice",
                    "mlflow.source.git.commit": "c0ffee", "aov.git.dirty": "false"}
    assert run_info.git_info(str(tmp_path / "elsewhere"), environ={}) == {}


def test_the_dataset_digest_follows_the_shard_contents_not_the_write_time(tmp_path, synthetic_data, monkeypatch):
    from aov_dist.data import shards as shards_mod
    from aov_dist.data.shards import write_shards

    def shards(out, records):
        monkeypatch.setattr(shards_mod, "_created", lambda: f"2026-12-0{len(list(tmp_path.iterdir()))}T00:00:00Z")
        write_shards([str(records)], str(out), image_root=str(synthetic_data.image_root), shard_size_mb=1,
                     on_error="fail", overwrite=True, log=lambda _: None)
        return json.loads((out / "manifest.json").read_text())

    first = shards(tmp_path / "a", synthetic_data.train_json)
    again = shards(tmp_path / "b", synthetic_data.train_json)
    records = json.loads(synthetic_data.train_json.read_text())
    (tmp_path / "fewer.json").write_text(json.dumps(records[:-1]))
    fewer = shards(tmp_path / "c", tmp_path / "fewer.json")
    assert first["created"] != again["created"]
    assert run_info.manifest_digest(first) == run_info.manifest_digest(again)
    assert run_info.manifest_digest(first) != run_info.manifest_digest(fewer)
    assert len(run_info.manifest_digest(first)) == 16  # MLflow keeps 36 characters of a digest

    (inp,) = run_info.dataset_inputs([SimpleNamespace(name="synth", manifest=str(tmp_path / "a/manifest.json"))],
                                     "training")
    assert (inp.dataset.name, inp.dataset.source_type) == ("synth", "local")
    assert json.loads(inp.dataset.profile)["num_samples"] == len(records)


def test_an_unreadable_manifest_is_left_out_of_the_inputs_with_a_warning_naming_it(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    missing = str(tmp_path / "gone" / "manifest.json")
    assert run_info.dataset_inputs([SimpleNamespace(name="d", manifest=missing)], "training") == []
    assert f"dataset d: manifest {missing} not read for MLflow" in caplog.text
