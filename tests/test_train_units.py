"""Unit tests of the training pieces that need no process group: schedules, checkpoint discovery
and pruning, RNG state round trip, the stage-1 loss, secret redaction."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from aov_dist.train import checkpoint as ckpt
from aov_dist.train.tasks import balanced_bce
from aov_dist.tracking.redact import MASK, flatten, redact


# ---------------------------------------------------------------- schedules

def _lrs(schedule: str, steps: int, total: int = 1000, spe: int = 10, every: float = 0.5, warmup: float = 0.0,
         min_ratio: float = 0.0) -> list[float]:
    """The lr factor at optimizer steps 0..steps-1 of a real scheduler (DeepSpeed steps it the same way)."""
    from aov_dist.train.config import StageConfig
    from aov_dist.train.strategy import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    stage = StageConfig(schedule=schedule, restart_every_epochs=every, warmup_ratio=warmup, min_lr_ratio=min_ratio)
    sched = lr_scheduler(opt, stage, total_steps=total, steps_per_epoch=spe)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_restarts_every_half_epoch():
    # 10 steps per epoch, restart every half epoch -> period 5: 1 at steps 0, 5, 10, 15, ...
    lrs = _lrs("cosine_restarts", 21)
    assert [lrs[s] for s in (0, 5, 10, 15, 20)] == pytest.approx([1.0] * 5)
    assert lrs[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5))) and lrs[7] == pytest.approx(lrs[2])
    assert lrs[:5] == sorted(lrs[:5], reverse=True) and lrs[4] > 0.0  # decreasing, never 0 within a period
    floored = _lrs("cosine_restarts", 6, min_ratio=0.1)  # the floor transformers' restarts lack: ours
    assert floored[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 5))) and floored[5] == 1.0
    assert _lrs("cosine_restarts", 2, spe=1) == pytest.approx([1.0, 1.0])  # a period is never 0 steps


def test_warmup_cosine():
    lrs = _lrs("warmup_cosine", 101, total=100, warmup=0.03)
    # ceil(100 * 0.03) = 3 warm-up steps from 0 (transformers' warm-up), then cosine over the other 97
    assert lrs[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert lrs[3 + 97 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert _lrs("warmup_cosine", 101, total=100, warmup=0.03, min_ratio=0.1)[100] == pytest.approx(0.1)
    assert _lrs("warmup_cosine", 1, total=10)[0] == pytest.approx(1.0)  # no warm-up: starts at the full lr


def test_constant_and_unknown_schedule():
    assert _lrs("constant", 8) == [1.0] * 8
    with pytest.raises(ValueError, match="stage.schedule"):
        _lrs("linear", 1)


# ---------------------------------------------------------------- checkpoint discovery / pruning

def _make_steps(root, committed: list[int], uncommitted: list[int]) -> None:
    for s in committed + uncommitted:
        d = root / "run" / f"step_{s}"
        (d / "ds").mkdir(parents=True)
        (d / "ds" / "x.pt").write_bytes(b"x")
        if s in committed:
            ckpt.write_marker(str(d), s, world_size=2)


def test_latest_committed_ignores_uncommitted_and_other_names(tmp_path):
    assert ckpt.latest_committed(str(tmp_path), "run") is None  # no run folder at all
    _make_steps(tmp_path, committed=[2, 10, 4], uncommitted=[12, 99])
    (tmp_path / "run" / "_ray").mkdir()
    (tmp_path / "run" / "step_x").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a step")
    # numeric order, not lexical (step_10 > step_4 > step_2); step_12 / step_99 lack the marker
    assert ckpt.latest_committed(str(tmp_path), "run") == f"{tmp_path}/run/step_10"
    assert [s for s, _, _ in ckpt.list_steps(str(tmp_path), "run")] == [2, 4, 10, 12, 99]
    marker = json.loads((tmp_path / "run" / "step_10" / ckpt.COMMIT_MARKER).read_text())
    assert marker["step"] == 10 and marker["world_size"] == 2
    assert ckpt.step_of(f"{tmp_path}/run/step_10/") == 10 and ckpt.step_of("x/step_1a") is None


def test_prune_keeps_newest_committed_and_newer_uncommitted(tmp_path):
    _make_steps(tmp_path, committed=[1, 2, 4, 5], uncommitted=[3, 6])
    doomed = ckpt.prune(str(tmp_path), "run", keep=2)
    assert sorted(ckpt.step_of(p) for p in doomed) == [1, 2, 3]
    left = {s: ok for s, _, ok in ckpt.list_steps(str(tmp_path), "run")}
    # step_6 may be a save in progress (newer than the newest commit): never touched
    assert left == {4: True, 5: True, 6: False}
    assert ckpt.prune(str(tmp_path), "run", keep=2) == []


def test_prune_keeps_the_steps_it_is_told_to(tmp_path):
    _make_steps(tmp_path, committed=[2, 4, 6, 8], uncommitted=[])
    deleted = ckpt.prune(str(tmp_path), "run", keep=1, keep_steps={4})
    assert sorted(deleted) == [f"{tmp_path}/run/step_2", f"{tmp_path}/run/step_6"]
    assert [s for s, _, _ in ckpt.list_steps(str(tmp_path), "run")] == [4, 8]


def test_prune_without_any_commit_deletes_nothing(tmp_path):
    _make_steps(tmp_path, committed=[], uncommitted=[1, 2])
    assert ckpt.prune(str(tmp_path), "run", keep=1) == []
    assert len(ckpt.list_steps(str(tmp_path), "run")) == 2


def test_discovery_and_prune_on_s3(s3_bucket):
    from aov_dist import storage

    root = f"{s3_bucket}/ckpts"
    for s in (1, 2, 3):
        storage.write_bytes(f"{root}/run/step_{s}/ds/x.pt", b"x")
    for s in (1, 2):
        ckpt.write_marker(f"{root}/run/step_{s}", s, world_size=1)
    assert ckpt.latest_committed(root, "run") == f"{root}/run/step_2"  # the scheme is kept
    assert ckpt.prune(root, "run", keep=1) == [f"{root}/run/step_1"]
    assert [(s, ok) for s, _, ok in ckpt.list_steps(root, "run")] == [(2, True), (3, False)]


def test_rng_state_round_trip_is_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ---------------------------------------------------------------- stage-1 loss

def test_balanced_bce_weighs_classes_equally():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    expected = 0.5 * (per[:3].mean() + per[3])
    assert float(balanced_bce(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    one_class = balanced_bce(logits[:2], labels[:2])
    assert float(one_class) == pytest.approx(float(per[:2].mean()), rel=1e-6)


# ---------------------------------------------------------------- redaction

def test_redact_masks_secret_keys_only():
    cfg = {"tracking": {"uri": "http://x", "token": "tok-123"},
           "cluster": {"env": {"AWS_SECRET_ACCESS_KEY": "abc", "NCCL_DEBUG": "WARN", "HF_TOKEN": ""}},
           "eval": {"judge": {"api_key_env": "AOV_JUDGE_API_KEY", "api_key": "sk-1", "model": "m"}},
           "list": [{"password": "pw"}, 3]}
    out = redact(cfg)
    assert out["tracking"] == {"uri": "http://x", "token": MASK}
    assert out["cluster"]["env"] == {"AWS_SECRET_ACCESS_KEY": MASK, "NCCL_DEBUG": "WARN", "HF_TOKEN": ""}
    assert out["eval"]["judge"] == {"api_key_env": "AOV_JUDGE_API_KEY", "api_key": MASK, "model": "m"}
    assert out["list"] == [{"password": MASK}, 3]
    assert cfg["tracking"]["token"] == "tok-123"  # a copy: the input is untouched
    flat = flatten(out)
    assert flat["cluster.env.AWS_SECRET_ACCESS_KEY"] == MASK and flat["list"] == [{"password": MASK}, 3]
    assert not any(v in ("tok-123", "abc", "sk-1", "pw") for v in map(str, flat.values()))
