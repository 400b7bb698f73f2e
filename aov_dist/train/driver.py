"""The driver: validate the config, create the MLflow run, start the Ray Train job, show progress,
log the final model. Nothing is started before the config is valid."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from aov_dist.config import TrainJobConfig, validate
from aov_dist.train import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: Optional[str]
    run_dir: str
    losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    latest_checkpoint: Optional[str] = None
    skipped: dict[str, int] = field(default_factory=dict)
    resumed_from: Optional[str] = None
    registered_model: Optional[str] = None


def init_ray(cfg: TrainJobConfig) -> None:
    """Join RAY_ADDRESS / cluster.address, or start a quiet local instance."""
    import ray

    from aov_dist.cluster.config import deepspeed_accelerator
    from aov_dist.cluster.scaling import runtime_env

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = runtime_env(cfg.cluster) or {}
    env.setdefault("env_vars", {}).update({
        # keep the job's working directory in the workers, so relative paths mean the same everywhere
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "PYTHONWARNINGS": "ignore",
        # the cluster section decides (cuda on GPU presets); a disagreeing DS_ACCELERATOR is an error
        "DS_ACCELERATOR": deepspeed_accelerator(cfg.cluster),
    })
    # Inside `ray job submit` Ray merges this env with the job's and refuses a key set in both
    # (launch/submit.py forwards OMP_NUM_THREADS, and DS_ACCELERATOR when the user set it; it
    # agrees with the cluster section, deepspeed_accelerator checked that): the job's value wins.
    for key in _job_env_keys():
        env["env_vars"].pop(key, None)
    # Worker output (DeepSpeed's chatter) stays in Ray's log files unless asked for.
    to_driver = os.environ.get("AOV_WORKER_LOGS", "0") == "1"
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=to_driver)
    else:
        # the dashboard process serves the state API Ray Train polls; bind it to loopback only
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.cluster.num_workers * cfg.cluster.cpus_per_worker),
                 dashboard_host="127.0.0.1", logging_level=logging.WARNING, log_to_driver=to_driver,
                 runtime_env=env)


def _job_env_keys() -> set[str]:
    """Environment variables of the Ray job this driver runs in (none outside a job)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError):
        return set()


def _absolute(path: Optional[str]) -> Optional[str]:
    return path if not path or "://" in path else os.path.abspath(path)


def _absolutize(c: TrainJobConfig) -> None:
    """Ray Train workers run in their own working directory: local paths are resolved here, on the
    driver (multi-node runs use s3:// or a shared filesystem, see cluster validation)."""
    c.train.storage_path = _absolute(c.train.storage_path)
    c.train.resume_from = _absolute(c.train.resume_from)
    c.model.pretrained_path = _absolute(c.model.pretrained_path)
    c.model.expert_path = _absolute(c.model.expert_path)
    c.stage.init_from = _absolute(c.stage.init_from)
    for d in c.data.datasets:
        d.manifest = _absolute(d.manifest)


def main(cfg: DictConfig | TrainJobConfig | dict[str, Any], show_progress: bool = True) -> TrainResult:
    """Run one training job. Callable from Python (tests) and from the Hydra app."""
    from aov_dist.cluster.config import deepspeed_accelerator
    from aov_dist.tracking import run_info
    from aov_dist.tracking.mlflow_tracker import create_run, finish_run
    from aov_dist.tracking.redact import redact

    c = validate(cfg)
    deepspeed_accelerator(c.cluster)  # this environment's DS_ACCELERATOR, before anything starts
    _absolutize(c)
    c.train.resume_from = ckpt.resume_point(c.train)
    if c.train.resume_from:
        ckpt.check_resume(c, c.train.resume_from)  # a mismatch is named before anything starts
    container = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    safe_yaml = OmegaConf.to_yaml(OmegaConf.create(redact(container)))
    run_id = create_run(c.tracking, run_info.run_display_name(c.model.preset, c.stage.name, c.train.run_name),
                        run_info.compared_params(container), safe_yaml, tags=_run_tags(c),
                        datasets=run_info.dataset_inputs(c.data.datasets, "training", c.data.s3_endpoint_url))
    status = "FAILED"
    try:
        result = _fit(c, container, run_id, show_progress)
        result.registered_model = _log_final_model(c, run_id, result.latest_checkpoint)
        status = "FINISHED"
        return result
    finally:
        finish_run(c.tracking, run_id, status)


def _run_tags(c: TrainJobConfig) -> dict[str, str]:
    from aov_dist.tracking.run_info import source_tags

    note = (f"{c.stage.name} of {c.model.preset} on {', '.join(d.name for d in c.data.datasets)}: "
            f"{c.cluster.num_workers} workers, ZeRO-{c.deepspeed.zero_stage}, global batch "
            f"{c.stage.global_batch_size}; checkpoints in {ckpt.run_dir(c.train.storage_path, c.train.run_name)}")
    return {**source_tags("aov_dist.train"), "aov.stage": c.stage.name, "aov.model": c.model.preset,
            "aov.run_dir": ckpt.run_dir(c.train.storage_path, c.train.run_name), "mlflow.note.content": note}


def _fit(c: TrainJobConfig, container: dict, run_id: Optional[str], show_progress: bool) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from aov_dist.cluster.scaling import scaling_config
    from aov_dist.train.loop import worker_entry
    from aov_dist.train.watchdog import collective_timeout_s

    init_ray(c)
    # The progress queue lives on the driver's machine, never on a worker node a job may lose
    # (its loss would fail the job at its end), and takes no CPU a worker could use.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(maxsize=10000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    done: dict[str, Any] = {}
    watcher = threading.Thread(target=_show_progress, args=(progress, done, show_progress, c.stage.name), daemon=True)
    watcher.start()
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"cfg": container, "run_id": run_id, "progress": progress},
        scaling_config=scaling_config(c.cluster),
        torch_config=TorchConfig(backend=c.cluster.backend, timeout_s=int(collective_timeout_s(c.train))),
        run_config=RunConfig(
            name=c.train.run_name,
            storage_path=_ray_storage(c.train.storage_path),
            failure_config=FailureConfig(max_failures=c.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=c.train.keep_checkpoints),
        ),
    )
    try:
        trainer.fit()
        watcher.join(timeout=30)
    finally:
        # also after a failed fit: a watcher left polling would reconnect to Ray after shutdown
        done["_stop"] = True
        watcher.join(timeout=5)
        with contextlib.suppress(Exception):  # never mask the fit's own error
            ray.kill(progress.actor)
    return TrainResult(run_id=run_id, run_dir=ckpt.run_dir(c.train.storage_path, c.train.run_name),
                       losses=done.get("losses", []), checkpoints=done.get("checkpoints", []),
                       latest_checkpoint=ckpt.latest_committed(c.train.storage_path, c.train.run_name),
                       skipped=done.get("skipped", {}), resumed_from=done.get("resumed_from"))


def _ray_storage(storage: str) -> str:
    """Ray Train keeps its own bookkeeping (and our pointer checkpoints) beside our step folders."""
    return f"{storage.rstrip('/')}/_ray"


def _show_progress(queue, done: dict, show: bool, stage: str) -> None:
    from tqdm.auto import tqdm

    bar = None
    while True:
        try:
            m = queue.get(timeout=1.0)
        except Exception:
            if done.get("_stop"):
                return
            continue
        if m.get("done"):
            done.update(m)
            if bar is not None:
                bar.close()
            return
        if show:
            if bar is None:
                bar = tqdm(total=m["total"], desc=f"train {stage}", unit="step", dynamic_ncols=True)
            bar.n = m["step"]
            bar.set_postfix(loss=f"{m['loss']:.4f}", samples_s=f"{m['samples_per_s']:.1f}", refresh=False)
            bar.refresh()


def _log_final_model(c: TrainJobConfig, run_id: Optional[str], latest: Optional[str]) -> Optional[str]:
    """Log the final HF export as an MLflow model and register it (models:/<name>/<version>).
    Without per-checkpoint exports (train.export_hf_in_checkpoints=false) the newest checkpoint's
    shards are merged here, on the driver. A tracking failure is a warning: the weights are safe
    in the checkpoint and ``aov-export`` + registration can be redone."""
    if not (c.tracking.enabled and run_id and latest):
        return None
    from aov_dist.tracking.config import registered_model_name
    from aov_dist.tracking.model_registry import log_and_register
    from aov_dist.train.export import export

    try:
        name = registered_model_name(c.tracking, c.model.preset, c.stage.name)
        with tempfile.TemporaryDirectory(prefix="aov-final-") as tmp:  # complete, even from a partial hf/
            return log_and_register(c.tracking, run_id, export(latest, f"{tmp}/hf"), name)
    except Exception as e:
        log.warning("final model of %s not logged/registered in MLflow (%s); the checkpoint holds it", latest, e)
        return None
