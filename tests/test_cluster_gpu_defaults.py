"""What a GPU cluster gets by default: DeepSpeed's CUDA accelerator decided by the cluster section
(an exported DS_ACCELERATOR that disagrees is refused before anything starts), worker-group
restarts, the GPU memory the planner budgets with, and the same values in the KubeRay RayJob."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from aov_dist.cluster import k8s, submit
from aov_dist.cluster.compose import compose_cluster
from aov_dist.cluster.config import ClusterConfigError, deepspeed_accelerator
from train_harness import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset, accelerator, restarts, gpu_gib", [
    ("h100", "cuda", 3, 80.0), ("a100", "cuda", 3, 80.0), ("local", "cpu", 0, 0.0)])
def test_presets_give_gpu_clusters_cuda_restarts_and_a_memory_budget(preset, accelerator, restarts, gpu_gib):
    cfg = compose_cluster(preset)
    assert deepspeed_accelerator(cfg, environ={}) == accelerator
    assert (cfg.max_failures, cfg.gpu_memory_gib) == (restarts, gpu_gib)


def test_an_exported_ds_accelerator_is_accepted_only_when_it_agrees():
    h100 = compose_cluster("h100")
    assert deepspeed_accelerator(h100, environ={"DS_ACCELERATOR": "cuda"}) == "cuda"
    with pytest.raises(ClusterConfigError, match=r"^cluster.use_gpu: true means DeepSpeed's 'cuda' accelerator .* "
                                                 r"DS_ACCELERATOR='cpu' is set"):
        deepspeed_accelerator(h100, environ={"DS_ACCELERATOR": "cpu"})


def test_make_launch_dry_run_on_h100_puts_no_cpu_accelerator_anywhere():
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RAY_ADDRESS")}
    proc = subprocess.run(["make", "--no-print-directory", "launch", "NODES=8", "CLUSTER=h100",
                           "SUBMIT_ARGS=--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8 node(s) x 8 workers = 64 workers, accelerator=cuda, backend=nccl, max_failures=3" in out
    env_vars = json.loads(out.split("request: ", 1)[1])["runtime_env"]["env_vars"]
    assert "DS_ACCELERATOR" not in env_vars  # the driver derives it from cluster=h100 on the cluster
    assert "cpu" not in json.dumps(env_vars).lower()


def test_submit_refuses_a_cpu_accelerator_for_a_gpu_preset(monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rc = submit.main(["train", "--nodes", "2", "--cluster", "h100", "--dry-run", "train.storage_path=s3://b/r"])
    assert rc == 2
    assert "error: cluster.use_gpu: true means DeepSpeed's 'cuda' accelerator" in capsys.readouterr().err


def test_driver_refuses_a_disagreeing_accelerator_before_any_run_exists(tmp_path, monkeypatch, synthetic_shards):
    from aov_dist.train.driver import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    db = tmp_path / "mlflow.db"
    cfg = compose_cfg([f"data.datasets.0.manifest={synthetic_shards.manifest_path}", "cluster=h100",
                       f"train.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{db}"])
    with pytest.raises(ClusterConfigError, match="DS_ACCELERATOR='cpu'"):
        main(cfg, show_progress=False)
    assert not db.exists()  # no MLflow run was created, no Ray started


def test_deepspeed_on_another_accelerator_than_the_cluster_section_is_refused_in_the_worker():
    import torch
    from deepspeed.accelerator import get_accelerator

    from aov_dist.config import to_typed
    from aov_dist.train.strategy import DeepSpeedStrategy

    have = get_accelerator().device_name()  # this process's: cpu here, cuda on a GPU machine
    preset, want = ("h100", "cuda") if have == "cpu" else ("local", "cpu")
    cfg = to_typed(compose_cfg([f"cluster={preset}"]))
    strategy = DeepSpeedStrategy(cfg, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=rf"DeepSpeed chose its '{have}' accelerator but cluster.use_gpu="
                                           rf"\w+ needs '{want}': set DS_ACCELERATOR={want}"):
        strategy.init_distributed()


def test_the_rayjob_trains_with_the_presets_restarts_and_accelerator():
    (job,) = k8s.render(8, "h100", ["experiment=aov_7b_stage2"], storage="s3://b/runs", run_name="r")["rayjob-train.yaml"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "aov_dist.train"]
    cfg = compose_cfg(words[3:])
    assert cfg.cluster.name == "h100" and cfg.cluster.nodes == 8 and cfg.cluster.max_failures == 3
    assert cfg.model.preset == "aov_7b" and cfg.deepspeed.zero_stage == 3
    assert job["spec"]["backoffLimit"] >= 1  # and KubeRay recreates the cluster beyond Ray's restarts
