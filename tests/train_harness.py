"""Helpers of the training tests: compose job configs, run ``run_training`` on N gloo ranks in
spawned processes (DeepSpeed for real, no Ray), read step folders and HF exports back, and commit
checkpoints through ``checkpointing.CheckpointWriter`` with stand-ins for the DeepSpeed engine.

Spawned processes (not forked): the parent test process may hold threads (MLflow, Ray), and each
rank must start with a clean torch.distributed / DeepSpeed state.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional

import torch

SYNTH_MANIFEST_NAME = "s"


def compose_cfg(overrides: list[str], config_name: str = "config"):
    """The Hydra-composed DictConfig of ``config_name`` with ``overrides`` (no validation):
    ``"config"`` is the training job (conf/config.yaml), ``"aov_eval_schema"`` aov-eval's root
    (its typed schema, registered here as the app registers it)."""
    from hydra import compose, initialize_config_dir

    from aov_dist.config import CONF_DIR, register_configs

    register_configs()
    if config_name == "aov_eval_schema":
        from aov_dist.eval.config import register_configs as register_eval_configs

        register_eval_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


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
        "cluster.nodes=1",
        f"cluster.workers_per_node={world}",
        f"deepspeed=zero{zero}",
        "deepspeed.param_persistence_threshold=0",
        f"train.storage_path='{storage}'",
        f"train.run_name={run_name}",
        f"tracking.enabled={'true' if tracking else 'false'}",
        "tracking.system_metrics=false",
    ]
    return ov + list(extra or [])


def tracked_epoch_overrides(manifest: str | Path, tmp_path: Path, run_name: str, extra=()) -> list[str]:
    """Overrides of one epoch of a 2-rank ZeRO-3 job (micro batch 2, global batch 4, no loader
    workers, no checkpoint before the epoch's end) tracked in an MLflow sqlite store under
    ``tmp_path``; its checkpoints go to ``tmp_path``/runs."""
    return tiny_overrides(manifest, tmp_path / "runs", world=2, num_workers=0, steps=-1, global_batch=4, micro=2,
                          run_name=run_name, tracking=True,
                          extra=["stage.epochs=1", "train.checkpoint_every_steps=100", "data.block_size=64",
                                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                 f"tracking.artifact_location={tmp_path}/art", *extra])


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
            "skipped": r.skipped, "metrics": metrics, "optimizer": r.optimizer, "restored_bytes": r.restored_bytes}


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


def run_ranks(cfg, out_dir: str | Path, rank_fn=train_rank, deadline_s: Optional[float] = None,
              expect_error: bool = False):
    """Run ``cfg`` (a TrainJobConfig from typed_cfg) on cfg.cluster.num_workers spawned gloo ranks;
    returns every rank's dict (also written to ``out_dir``/rank_<r>.json).

    ``rank_fn(cfg, rank, world) -> dict`` defaults to ``train_rank``: the LoopResult (losses are
    global means, equal on all ranks) and rank 0's metrics. The spawned process imports it by
    name, so it is a module-level function, or a ``functools.partial`` of one that binds extra
    keyword arguments (``partial(train_rank, run_id=...)``).

    ``deadline_s``: a rank still running then is a hang: the ranks are killed and the test fails
    (instead of hanging the suite). ``expect_error``: a rank must raise; returns that exception
    (spawn has stopped the other ranks; its text holds the rank's traceback) and fails the test
    when every rank finished. Without it, a rank's exception is raised here."""
    import time

    import pytest
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf
    from torch.multiprocessing.spawn import ProcessException

    world = cfg.cluster.num_workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    ctx = mp.spawn(_rank_main, args=(world, free_port(), container, str(out_dir), rank_fn), nprocs=world, join=False)
    end = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=2):
            if end is not None and time.monotonic() > end:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{world}-rank job still running after {deadline_s} s: a rank hangs")
    except ProcessException as e:  # a rank raised or died
        if expect_error:
            return e
        raise
    if expect_error:
        pytest.fail(f"{world}-rank job finished on every rank, but a rank was expected to raise")
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


# ---- checkpoint saves without DeepSpeed: CheckpointWriter (the real commit/prune code) with stand-ins ----


class FakeStrategy:
    """The strategy's save side, writing plain files; its HF export is the module's (which may fail)."""

    def __init__(self, module: "FakeModule"):
        self.module = module

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        Path(directory, "state.bin").write_bytes(b"ds")

    def consolidated_state_dict(self, trainable_only: bool = False) -> dict:
        return {}

    def write_hf(self, directory: str, state: dict, processor, base=None) -> None:
        self.module.save_pretrained(directory)
        processor.save_pretrained(directory)

    def barrier(self) -> None:  # one process: nothing to wait for
        pass

    def sum_over_ranks(self, counts):  # one process: its own counts
        return list(counts)


class FakeModule:
    """An HF export that writes half a file, then fails with a full disk on step ``fail_on_step``
    (``step_ref[0]`` is the step being saved)."""

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


def job_cfg(storage: str, keep: int = 1):
    """A TrainJobConfig saving run ``run`` under ``storage``, keeping ``keep`` checkpoints."""
    from aov_dist.config import TrainJobConfig

    c = TrainJobConfig()
    c.stage.lr = {"expert": 1e-4}
    c.data.datasets[0].manifest = "shards/manifest.json"  # a data group always names one
    c.train.storage_path, c.train.run_name, c.train.keep_checkpoints = storage, "run", keep
    return c


def save_checkpoint(cfg, step: int, module: Optional[FakeModule] = None) -> str:
    """The save of step ``step`` on rank 0 of 1 with the stand-ins, waited for (a remote upload
    too) and committed; returns the committed step folder."""
    from aov_dist.train.checkpointing import CheckpointWriter

    committed: list[str] = []
    writer = CheckpointWriter(cfg, FakeStrategy(module or FakeModule()), FakeProcessor(), rank=0, world=1,
                              on_commit=lambda s, path, m: committed.append(path))
    writer.save(step, [0.5] * step, FakeLoader(), None, {})
    writer.finish()
    (path,) = committed
    return path


# ---- Ray Train jobs driven by tests ----

def install_worker_setup_hook(monkeypatch, test_file: str, hook: str, env_vars: dict[str, str]) -> None:
    """Run ``<test module>.<hook>`` in every Ray worker process of jobs the driver starts from now
    on (Ray's ``worker_process_setup_hook``), with ``env_vars`` set and the tests folder importable."""
    from aov_dist.cluster import scaling

    tests_dir = str(Path(test_file).resolve().parent)
    real_env = scaling.runtime_env

    def runtime_env_with_hook(cluster):
        env = real_env(cluster) or {}
        env.setdefault("env_vars", {}).update({**env_vars, "PYTHONPATH": os.pathsep.join(
            p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)})
        env["worker_process_setup_hook"] = f"{Path(test_file).stem}.{hook}"
        return env

    monkeypatch.setattr(scaling, "runtime_env", runtime_env_with_hook)


def ray_registered_a_checkpoint(storage: str | Path) -> bool:
    """Whether Ray Train's checkpoint manager under ``storage``/_ray has registered a report."""
    import glob

    for snapshot in glob.glob(f"{storage}/_ray/**/checkpoint_manager_snapshot.json", recursive=True):
        try:
            if "checkpoint_" in Path(snapshot).read_text():
                return True
        except OSError:  # being rewritten
            pass
    return False


def act_once_committed(ready: Callable[[], bool], step_folder: str, act: Callable[[], None], record: dict,
                       wait_s: float) -> None:
    """Body of a test's background thread: once ``ready()`` holds, ``step_folder`` is committed and
    Ray Train has registered a checkpoint (under the step folder's storage), run ``act`` and set
    ``record["done"]``; a timeout or an exception lands in ``record["error"]`` for the test to report."""
    import time

    from aov_dist.train import checkpoint as ckpt

    storage = Path(step_folder).parents[1]
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if ready() and ckpt.is_committed(step_folder) and ray_registered_a_checkpoint(storage):
                act()
                record["done"] = True
                return
            time.sleep(0.2)
        record["error"] = f"not ready / {step_folder} not committed / no Ray registration within {wait_s} s"
    except Exception as e:  # reported by the test, not lost in the thread
        record["error"] = repr(e)
