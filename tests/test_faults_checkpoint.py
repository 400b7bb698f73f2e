"""Crash during a checkpoint write: a half-written step folder is never loaded, and old checkpoints
are deleted only after a newer one is committed.

The fast tests drive ``loop._save`` (the real commit/prune code) with stand-ins for the DeepSpeed
engine, so a failure can be planted at any file-system call; the slow one crashes a real 1-rank
ZeRO-3 run while it writes step 4 and resumes it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

from aov_dist.config import TrainJobConfig
from aov_dist.train import checkpoint as ckpt
from aov_dist.train import loop
from train_harness import free_port as _free_port


class FakeStrategy:
    """The strategy's save side, writing plain files; its HF export is the module's (which may fail)."""

    def __init__(self, module: "FakeModule"):
        self.module = module

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        Path(directory, "state.bin").write_bytes(b"ds")

    def save_hf(self, directory: str, processor) -> None:
        self.module.save_pretrained(directory)
        processor.save_pretrained(directory)

    def barrier(self) -> None:  # one process: nothing to wait for
        pass


class FakeModule:
    def __init__(self, fail_on_step: Optional[int] = None, step_ref: Optional[list] = None):
        self.fail_on_step, self.step_ref = fail_on_step, step_ref

    def save_pretrained(self, path: str, state_dict=None, safe_serialization=True) -> None:
        os.makedirs(path, exist_ok=True)
        Path(path, "model.safetensors").write_bytes(b"half")  # half written, then the disk fails
        if self.step_ref and self.step_ref[0] == self.fail_on_step:
            raise OSError(28, "No space left on device")


class FakeProcessor:
    def save_pretrained(self, path: str) -> None:
        Path(path, "processor.json").write_text("{}")


class FakeLoader:
    epoch = 0

    def state_dict(self) -> dict:
        return {"version": 1}


def job_cfg(storage: str, keep: int = 1) -> TrainJobConfig:
    c = TrainJobConfig()
    c.stage.lr = {"expert": 1e-4}
    c.data.datasets[0].manifest = "shards/manifest.json"  # a data group always names one
    c.train.storage_path, c.train.run_name, c.train.keep_checkpoints = storage, "run", keep
    return c


def save(cfg: TrainJobConfig, step: int, module: Optional[FakeModule] = None) -> str:
    result = loop.LoopResult(step=step, losses=[0.5] * step)
    return loop._save(cfg, FakeStrategy(module or FakeModule()), FakeProcessor(), FakeLoader(), result,
                      rank=0, world=1)


def test_failed_save_leaves_no_marker_and_keeps_the_last_committed(tmp_path):
    cfg = job_cfg(str(tmp_path), keep=1)
    step = [2]
    module = FakeModule(fail_on_step=4, step_ref=step)
    assert save(cfg, 2, module) == f"{tmp_path}/run/step_2"
    step[0] = 4
    with pytest.raises(OSError, match="No space left"):
        save(cfg, 4, module)
    # the half-written folder exists, without its marker; keep=1 did not delete step 2
    assert (tmp_path / "run/step_4/hf/model.safetensors").exists()
    assert not (tmp_path / "run/step_4" / ckpt.COMMIT_MARKER).exists()
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(tmp_path), "run")] == [(2, True), (4, False)]
    assert ckpt.latest_committed(str(tmp_path), "run") == f"{tmp_path}/run/step_2"
    # the next successful save commits, then prunes step 2 and the leftover step 4
    step[0] = 6
    save(cfg, 6, module)
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(tmp_path), "run")] == [(6, True)]


def test_marker_write_failure_leaves_step_uncommitted(tmp_path, monkeypatch):
    cfg = job_cfg(str(tmp_path), keep=1)
    save(cfg, 2)
    real = ckpt.write_marker

    def failing_marker(path, step, world):
        if step == 4:
            raise OSError("I/O error while writing the marker")
        real(path, step, world)

    monkeypatch.setattr(ckpt, "write_marker", failing_marker)
    pruned = []
    monkeypatch.setattr(ckpt, "prune", lambda *a, **k: pruned.append(a))
    with pytest.raises(OSError, match="marker"):
        save(cfg, 4)
    assert pruned == []  # never pruned without a newer commit
    assert ckpt.latest_committed(str(tmp_path), "run") == f"{tmp_path}/run/step_2"
    assert (tmp_path / "run/step_4/trainer_state.json").exists()


def test_resume_from_an_uncommitted_folder_is_refused(tmp_path, synthetic_shards):
    from aov_dist.config import ConfigError
    from train_harness import compose_cfg, tiny_overrides

    cfg = job_cfg(str(tmp_path))
    save(cfg, 2)
    os.makedirs(tmp_path / "run/step_4/ds")
    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path, run_name="run",
                        extra=[f"train.resume_from={tmp_path}/run/step_4"])
    from aov_dist.config import validate

    with pytest.raises(ConfigError, match=r"train.resume_from: .*step_4.* is not a committed checkpoint"):
        validate(compose_cfg(ov))


# ---- a real crash while writing step 4, then resume (1 gloo rank, ZeRO-3) ----


def _crashing_rank(rank: int, port: int, container: dict, out: str, crash_step: Optional[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from aov_dist.config import to_typed
    from aov_dist.train import checkpoint as ck
    from aov_dist.train.loop import run_training

    torch.set_num_threads(1)
    real = ck.write_marker

    def marker(path, step, world):  # the process dies after every file but the marker is written
        if step == crash_step:
            raise OSError("simulated crash before the commit marker")
        real(path, step, world)

    ck.write_marker = marker
    dist.init_process_group("gloo", rank=0, world_size=1)
    steps: list[float] = []
    record = {"losses": steps}
    try:
        r = run_training(to_typed(container), 0, 1, on_step=lambda m: steps.append(m["loss"]))
        record.update(result=r.losses, resumed_from=r.resumed_from)
    except OSError as e:
        record["error"] = str(e)
    finally:
        Path(out).write_text(json.dumps(record))
        dist.destroy_process_group()


def _run(overrides: list[str], out: Path, crash_step: Optional[int]) -> dict:
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    from train_harness import typed_cfg

    c = typed_cfg(overrides)
    container = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    mp.spawn(_crashing_rank, args=(_free_port(), container, str(out), crash_step), nprocs=1, join=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_crash_while_writing_step4_resumes_from_step2_with_the_same_losses(tmp_path, synthetic_shards):
    from train_harness import tiny_overrides

    ov = tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=1, num_workers=0, steps=4,
                        global_batch=2, micro=2, run_name="crash",
                        extra=["train.checkpoint_every_steps=2", "train.keep_checkpoints=1"])
    crashed = _run(ov, tmp_path / "a.json", crash_step=4)
    assert "simulated crash" in crashed["error"] and len(crashed["losses"]) == 4
    root = str(tmp_path / "runs")
    assert [(s, ok) for s, _, ok in ckpt.list_steps(root, "crash")] == [(2, True), (4, False)]

    resumed = _run(ov, tmp_path / "b.json", crash_step=None)
    assert resumed["resumed_from"] == f"{root}/crash/step_2"  # never the half-written step 4
    # steps 3 and 4 again, from the step-2 state: exactly the losses of the crashed run
    assert resumed["result"] == pytest.approx(crashed["losses"], rel=1e-6, abs=1e-7)
    assert [(s, ok) for s, _, ok in ckpt.list_steps(root, "crash")] == [(4, True)]
    assert json.loads((tmp_path / "runs/crash/step_4/trainer_state.json").read_text())["step"] == 4
