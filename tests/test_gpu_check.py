"""`make gpu-check`: the GPU rehearsal refuses to pretend on a machine without CUDA, runs the same
script at tiny size on the CPU when asked, and never needs what a bare GPU machine lacks (Ray,
MLflow, S3 clients: hidden here in every process it starts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
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
    # the loop's ledger (aov_dist/model/flops.py) counted both ranks' micro-batches; on CPU it logs
    # no mfu, so the summary divides its FLOPs by the step time and the measured CPU peak
    assert run["model_flops_per_step"] == summary["flops_per_step"] > 0
    assert run["mfu_source"].startswith("goodput/model_flops")
    assert run["tokens_per_s"] == pytest.approx(summary["sample"]["seq_len"] * run["samples_per_s"], rel=1e-9)
    # fp32 on CPU: the resumed engine's next-step loss is the uninterrupted one, bit for bit
    assert summary["resume"]["checkpoint_step"] == 2 and summary["resume"]["rel_diff"] == 0.0
    assert summary["resume"]["loss_uninterrupted"] == run["losses"][2]
    assert len(summary["eval"]["replies"]) == 2 and len(summary["eval"]["expert_scores"]) == 2
    # (e) packing: SDPA on CPU, so rows of <= data.max_length (each micro-batch fits in one)
    packing = summary["packing"]
    assert packing["attn"] == "sdpa" and packing["layout"].startswith("rows")
    samples, micro_batches = packing["micro_batch"] * packing["micro_batches"], packing["micro_batches"]
    assert len(packing["sample_tokens"]) == samples and len(set(packing["sample_tokens"])) > 1  # varied lengths
    assert packing["real_tokens"] == sum(packing["sample_tokens"])
    padded, packed = packing["padded"], packing["packed"]
    assert padded["rows"] == samples and packed["rows"] == micro_batches
    assert packed["padding_fraction"] == 0.0 < padded["padding_fraction"] < 1
    assert padded["model_flops"] == packed["model_flops"] > 0  # model FLOPs count no padding
    for layout in (padded, packed):
        assert layout["tokens_per_s"] == pytest.approx(packing["real_tokens"] / layout["seconds"], rel=1e-9)
    assert packing["packed_over_padded_tokens_per_s"] == pytest.approx(
        packed["tokens_per_s"] / padded["tokens_per_s"], rel=1e-9)
    # fp32: the first micro-batch's loss is the same packed as padded
    assert packing["loss_rel_tol"] == 1e-5 and packing["loss_rel_diff"] <= 1e-5
    assert summary["checks"]["packed_loss_equals_padded"] is True
    assert summary["checks"]["loop_flops_equal_flops_py"] is True


def _step(mfu=None, samples=4.0, samples_per_s=8.0, flops=1e12) -> dict:
    m = {"goodput/samples": samples, "samples_per_s": samples_per_s, "goodput/model_flops": flops,
         "goodput/text_tokens": 300.0, "goodput/image_tokens": 100.0}
    return m if mfu is None else {**m, "mfu": mfu}


def test_speed_reads_the_loops_mfu_on_gpu_and_computes_it_on_cpu():
    opts = {"global_batch": 4, "world": 2}
    base = {"first_step_s": 1.0, "peak_mem_gib": None, "losses": [1.0, 1.0, 1.0, 1.0]}
    # the loop logged mfu (GPU): its median over the steps after the first, whatever the peak given here
    gpu = gpu_check._speed({**base, "steps": [_step(0.9), _step(0.30), _step(0.40), _step(0.35)]}, opts, peak=1.0)
    assert gpu["mfu_pct"] == pytest.approx(35.0) and gpu["mfu_source"] == "loop metric mfu"
    assert gpu["step_ms_median"] == pytest.approx(500.0) and gpu["tokens_per_s"] == pytest.approx(800.0)
    assert gpu["model_flops_per_step"] == 1e12
    # no mfu (CPU): model FLOPs / the loop's step time / (peak x ranks)
    cpu = gpu_check._speed({**base, "steps": [_step(), _step(), _step(), _step()]}, opts, peak=1e12)
    assert cpu["mfu_pct"] == pytest.approx(100 * 1e12 / 0.5 / 2e12)
    assert cpu["mfu_source"].startswith("goodput/model_flops")


def test_measured_peak_goes_into_the_job_config():
    opts = {"gpu": False, "world": 2, "preset": "tiny", "grad_ckpt": False, "steps": 4, "micro": 1, "accum": 1,
            "workdir": "/tmp/unused", "checkpoint_at": 2}
    cfg = gpu_check.job_config(opts, "sdpa", "run", peak_flops=3.712345e11)
    assert cfg.train.peak_flops_per_device == pytest.approx(3.712345e11, rel=1e-6)
    assert cfg.data.max_length == gpu_check.MAX_LENGTH


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_passes_on_this_gpu(tmp_path):
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = _make([f"GPU_CHECK_ARGS=--json {out}"], env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["backend"] == "nccl" and summary["precision"] == "bf16"
    assert summary["runs"]["sdpa"]["mfu_source"] == "loop metric mfu" and 0 < summary["runs"]["sdpa"]["mfu_pct"] < 100
    assert summary["packing"]["loss_rel_tol"] == 2e-2 and summary["checks"]["packed_loss_equals_padded"]
