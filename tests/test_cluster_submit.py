"""launch/submit.py: the `ray job submit` command it builds, and what it refuses (no Ray needed)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from aov_dist.cluster import entrypoints as ep
from aov_dist.cluster import submit

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_without_ray_address_explains_and_points_to_local_run():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = _run_script("train", "--nodes", "2", "--cluster", "h100", "stage=stage2", env=env)
    assert proc.returncode == 2
    assert "RAY_ADDRESS is not set" in proc.stderr
    assert "make train" in proc.stderr
    assert "python -m aov_dist.train cluster=h100 cluster.nodes=2 stage=stage2" in proc.stderr


def test_eval_without_ray_address_points_to_make_eval(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.main(["eval", "--cluster", "local"]) == 2
    assert "Run locally instead: make eval" in capsys.readouterr().err


def test_dry_run_shows_exact_train_entrypoint(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # the suite's CPU setting would contradict a100
    rc = submit.main(["train", "--nodes", "2", "--cluster", "a100", "--dry-run", "--submission-id", "job-1",
                      "--", "tags=[a, b]", "train.storage_path=s3://b/runs"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 node(s) x 8 workers = 16 workers" in out
    assert "-> http://head:8265" in out
    request = json.loads(out.split("request: ", 1)[1])
    # Ray runs the entry point through a shell: every word quoted, the override with a space stays one
    assert shlex.split(request["entrypoint"]) == ["python", "-m", "aov_dist.train", "cluster=a100", "cluster.nodes=2",
                                                  "tags=[a, b]", "train.storage_path=s3://b/runs"]
    assert request["submission_id"] == "job-1"
    renv = request["runtime_env"]
    assert renv["working_dir"] == str(ROOT)
    assert ".venv/" in renv["excludes"] and "data_shards/" in renv["excludes"]


def test_eval_job_runs_the_watcher_on_every_worker_slot():
    cmd, cfg = submit.job_entrypoint("eval", "h100", 2, ["tracking.uri=http://m:5000"])
    assert cmd == ["python", "-m", "aov_dist.eval", "mode=watch", "cluster=h100", "cluster.nodes=2",
                   "eval.num_workers=16", "tracking.uri=http://m:5000"]
    cmd, _ = submit.job_entrypoint("eval", "h100", 2, ["num_workers=3"])
    assert "eval.num_workers=16" not in cmd and cmd[-1] == "num_workers=3"


def test_multi_node_train_with_local_storage_is_refused_before_submitting(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    rc = submit.main(["train", "--nodes", "2", "--cluster", "h100", "train.storage_path=/scratch/ckpt"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: train.storage_path: '/scratch/ckpt' is a node-local path")


def test_secret_env_is_refused_and_plain_env_forwarded():
    with pytest.raises(submit.SubmitError, match="AWS_SECRET_ACCESS_KEY: looks like a credential"):
        submit.runtime_env(["AWS_SECRET_ACCESS_KEY=abc"], environ={})
    renv = submit.runtime_env(["NCCL_DEBUG=INFO"], environ={"AWS_ENDPOINT_URL": "http://s3:9000",
                                                            "AWS_ACCESS_KEY_ID": "AKIAFAKE"})
    env = renv["env_vars"]
    assert {k: v for k, v in env.items() if not k.startswith("AOV_GIT_")} == {
        "AWS_ENDPOINT_URL": "http://s3:9000", "NCCL_DEBUG": "INFO"}
    # the job's MLflow runs name this checkout's commit (the uploaded copy has no .git)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(__file__)).stdout.strip()
    assert env["AOV_GIT_COMMIT"] == head and env["AOV_GIT_DIRTY"] in ("true", "false")


@pytest.mark.parametrize("name,secret", [("MLFLOW_TRACKING_PASSWORD", True), ("AWS_ACCESS_KEY_ID", True),
                                         ("AOV_JUDGE_API_KEY", True), ("HF_TOKEN", True),
                                         ("NCCL_DEBUG", False), ("AWS_ENDPOINT_URL", False)])
def test_is_secret_name(name, secret):
    assert submit.is_secret_name(name) is secret


def test_train_and_probe_commands_share_the_cluster_arguments():
    assert ep.train_command("h100", 4, ["x=1"])[3:] == ["cluster=h100", "cluster.nodes=4", "x=1"]
    assert ep.probe_command("h100", 4, ["x=1"])[3:] == ["cluster=h100", "cluster.nodes=4", "x=1"]
