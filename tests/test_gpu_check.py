"""`make gpu-check`: the GPU rehearsal refuses to pretend on a machine without CUDA, runs the same
script at tiny size on the CPU when asked, and never needs what a bare GPU machine lacks (Ray,
MLflow, S3 clients: hidden here in every process it starts)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Not on the GPU machine and not carried by make gpu-wheels: the check must not import them.
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "s3fs", "boto3", "botocore", "webdataset", "rouge_score", "moto")


def _make(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "gpu-check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env_without(tmp_path: Path, hidden: tuple[str, ...]) -> dict:
    """The environment of a process tree in which ``hidden`` cannot be imported (sitecustomize runs
    in every Python process started with it, spawned ranks too)."""
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hidden))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(site)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_without_a_gpu_fails_with_the_way_to_rehearse(tmp_path):
    proc = _make([], _env_without(tmp_path, ()), timeout=300)
    assert proc.returncode != 0
    assert "no CUDA device is visible" in proc.stderr
    assert "GPU_CHECK_ARGS=--allow-cpu" in proc.stderr


@pytest.mark.slow
def test_gpu_check_rehearses_on_cpu_without_ray_mlflow_or_s3(tmp_path):
    out = tmp_path / "summary.json"
    proc = _make([f"GPU_CHECK_ARGS=--allow-cpu --steps 4 --json {out}"], _env_without(tmp_path, ABSENT_ON_GPU_MACHINE),
                 timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    summary = json.loads(out.read_text())
    assert printed == summary
    assert summary["ok"] is True and all(summary["checks"].values()), summary["checks"]
    assert summary["world"] == 2 and summary["backend"] == "gloo" and summary["accelerator"] == "cpu"
    assert summary["optimizer"] == "torch.AdamW" and summary["zero_stage"] == 3
    run = summary["runs"]["sdpa"]
    assert len(run["losses"]) == 4 and run["tokens_per_s"] > 0 and 0 < run["mfu_pct"] < 100
    # fp32 on CPU: the resumed engine's next-step loss is the uninterrupted one, bit for bit
    assert summary["resume"]["checkpoint_step"] == 2 and summary["resume"]["rel_diff"] == 0.0
    assert summary["resume"]["loss_uninterrupted"] == run["losses"][2]
    assert len(summary["eval"]["replies"]) == 2 and len(summary["eval"]["expert_scores"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_passes_on_this_gpu(tmp_path):
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = _make([f"GPU_CHECK_ARGS=--json {out}"], env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["backend"] == "nccl" and summary["precision"] == "bf16"
