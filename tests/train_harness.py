"""Helpers of the training tests: compose job configs, run ``run_training`` on N gloo ranks in
spawned processes (DeepSpeed for real, no Ray), read step folders and HF exports back.

Spawned processes (not forked): the parent test process may hold threads (MLflow, Ray), and each
rank must start with a clean torch.distributed / DeepSpeed state.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

import torch

SYNTH_MANIFEST_NAME = "s"


def compose_cfg(overrides: list[str]):
    """The Hydra-composed DictConfig of conf/config.yaml with ``overrides`` (no validation)."""
    from hydra import compose, initialize_config_dir

    from aov_dist.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_overrides(manifest: str | Path, storage: str | Path, *, world: int = 1, num_workers: int = 1,
                   steps: int = 4, global_batch: int = 8, micro: int = 2, zero: int | str = 3,
                   run_name: str = "golden", tracking: bool = False, extra: Optional[list[str]] = None) -> list[str]:
    """Overrides of a tiny stage-1 job on ``manifest``: ``world`` workers, ZeRO-``zero`` really
    partitioned (persistence threshold 0), no MLflow unless ``tracking``."""
    ov = [
        f"data.datasets=[{{name: {SYNTH_MANIFEST_NAME}, manifest: '{manifest}', weight: 1.0}}]",
        f"data.num_workers={num_workers}",
        f"data.micro_batch_size={micro}",
        f"stage.global_batch_size={global_batch}",
        f"stage.max_steps={steps}",
        f"cluster.nodes=1",
        f"cluster.workers_per_node={world}",
        f"deepspeed=zero{zero}",
        "deepspeed.param_persistence_threshold=0",
        f"train.storage_path='{storage}'",
        f"train.run_name={run_name}",
        f"tracking.enabled={'true' if tracking else 'false'}",
        "tracking.system_metrics=false",
    ]
    return ov + list(extra or [])


def typed_cfg(overrides: list[str]):
    """Validated TrainJobConfig with local paths made absolute (what the driver hands to workers)."""
    from aov_dist.config import validate
    from aov_dist.train.driver import _absolutize

    c = validate(compose_cfg(overrides))
    _absolutize(c)
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank(cfg, rank: int, world: int, **kwargs: Any) -> dict:
    """run_training on this rank; its LoopResult and rank 0's per-step metrics as a dict."""
    from aov_dist.train.loop import run_training

    metrics: list[dict] = []  # what rank 0 would log to MLflow, per step
    r = run_training(cfg, rank, world, on_step=metrics.append, **kwargs)
    return {"step": r.step, "losses": r.losses, "checkpoints": r.checkpoints, "resumed_from": r.resumed_from,
            "skipped": r.skipped, "metrics": metrics, "optimizer": r.optimizer}


def _rank_main(rank: int, world: int, port: int, container: dict, out_dir: str, rank_fn) -> None:
    """One rank of a spawned gloo job: ``rank_fn(cfg, rank, world)``, its dict written as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from aov_dist.config import to_typed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = rank_fn(to_typed(container), rank, world)
        with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_ranks(cfg, out_dir: str | Path, rank_fn=train_rank, deadline_s: Optional[float] = None) -> list[dict]:
    """Run ``cfg`` (a TrainJobConfig from typed_cfg) on cfg.cluster.num_workers spawned gloo ranks;
    returns every rank's dict. ``rank_fn(cfg, rank, world) -> dict`` (a module-level function, so
    the spawned process can import it) defaults to ``train_rank``: the LoopResult (losses are global
    means, equal on all ranks) and rank 0's metrics. ``deadline_s``: a rank still running then is a
    hang: the ranks are killed and the test fails (instead of hanging the suite)."""
    import time

    import pytest
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    world = cfg.cluster.num_workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    ctx = mp.spawn(_rank_main, args=(world, free_port(), container, str(out_dir), rank_fn), nprocs=world, join=False)
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if end is not None and time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-rank job still running after {deadline_s} s: a rank hangs")
    return [json.loads((out_dir / f"rank_{r}.json").read_text()) for r in range(world)]


def hf_state(step_folder: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated weights of a checkpoint's hf/ export."""
    from safetensors.torch import load_file

    files = sorted(Path(step_folder, "hf").glob("*.safetensors"))
    assert files, f"no safetensors in {step_folder}/hf"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


# The attention key bias adds the same q.b_k to every key's logit: softmax ignores it, so its true
# gradient is 0 and what autograd returns is rounding noise (~1e-9), which Adam normalises into
# +-lr steps of arbitrary sign. Its value is therefore not reproducible across reduction orders.
GRADIENT_FREE = ("expert.q_former.key_proj.bias",)


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4,
                        atol: float = 1e-6, skip: tuple[str, ...] = GRADIENT_FREE) -> None:
    assert sorted(a) == sorted(b), f"different keys: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        if k in skip:
            continue
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def trainer_state(step_folder: str | Path) -> dict[str, Any]:
    return json.loads(Path(step_folder, "trainer_state.json").read_text())
