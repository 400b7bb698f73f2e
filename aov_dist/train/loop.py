"""The per-worker training loop: the same code on every rank, with or without Ray.

Every rank builds the model (under zero.Init for ZeRO-3), the DeepSpeed engine and its own shard
stream, runs the same modules the same number of times (ZeRO-3 hangs otherwise), and writes its
part of each checkpoint; rank 0 logs and commits.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from aov_dist.config import TrainJobConfig, micro_steps_per_step, to_typed
from aov_dist import storage
from aov_dist.train import checkpoint as ckpt
from aov_dist.train.strategy import DeepSpeedStrategy
from aov_dist.train.tasks import make_task

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, global mean, since step 0
    checkpoints: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    resumed_from: Optional[str] = None
    optimizer: str = ""
    restored_bytes: int = 0  # what this rank downloaded to resume (remote checkpoints)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StepTotals:
    loss: float  # mean over ranks of each rank's mean micro-batch loss
    tokens: int  # summed over ranks
    skipped: dict[str, int]  # per skip reason, summed over ranks (the job's bad samples)


def _step_totals(strategy: DeepSpeedStrategy, loss_sum: torch.Tensor, accum: int, tokens: int,
                 skipped: dict[str, int], world: int) -> StepTotals:
    """One all-reduce per step for every number the step logs (a round trip each otherwise). A
    fixed reason list keeps the tensor the same size on every rank."""
    from aov_dist.data.decode import SKIP_REASONS

    v = strategy.reduce_step_totals(loss_sum, [float(tokens), *(float(skipped.get(k, 0)) for k in SKIP_REASONS)])
    return StepTotals(v[0] / accum / world, int(v[1]), {k: int(c) for k, c in zip(SKIP_REASONS, v[2:])})


def run_training(cfg: TrainJobConfig, rank: int, world: int, run_id: Optional[str] = None,
                 on_step: Optional[Callable[[dict], None]] = None,
                 on_checkpoint: Optional[Callable[[int, str, dict], None]] = None,
                 task: Any = None, stop_after: Optional[int] = None,
                 on_end: Optional[Callable[[Any, Any], None]] = None,
                 strategy: Optional[DeepSpeedStrategy] = None) -> LoopResult:
    """Train until the stage's last step. Needs torch.distributed initialised when world > 1.

    ``task`` defaults to the stage's (tasks.make_task); ``strategy`` to a DeepSpeedStrategy on
    this worker's device (the current CUDA device on GPU clusters). ``stop_after`` ends the loop
    after that step, as a job killed right after its checkpoint would (tests of resume).
    ``on_end(strategy, processor)`` runs on every rank after the last step (collective use
    allowed, e.g. a probe forward under ``strategy.gathered``). The loop never touches the
    DeepSpeed engine: every step, save and load goes through the strategy.
    """
    from aov_dist.data.skip_policy import SkipPolicy
    from aov_dist.tracking.mlflow_tracker import make_tracker
    from aov_dist.tracking.system_metrics import start_node_monitor, stop_node_monitor

    quiet_library_warnings()
    strategy = strategy or DeepSpeedStrategy(cfg)
    strategy.init_distributed()
    seed_everything(cfg.train.seed)
    task = task or make_task(cfg.stage.name)
    model, processor = strategy.build_model(lambda: task.build_model(cfg, gather=strategy.gathered_for_update))
    groups = model.stage_parameter_groups(cfg.stage.name, train_vision_tower="vision_tower" in cfg.stage.lr)

    accum = micro_steps_per_step(cfg)
    loader = task.build_loader(cfg, processor, rank, world)
    steps_per_epoch = max(1, loader.batches_per_epoch // accum)
    total = cfg.stage.max_steps if cfg.stage.max_steps > 0 else max(1, math.floor(cfg.stage.epochs * steps_per_epoch))
    strategy.initialize(model, groups, total, steps_per_epoch)
    del model  # from here on the engine owns it
    skips = SkipPolicy(cfg.data.skip_window, cfg.data.max_skip_fraction, cfg.data.fail_skip_fraction)

    result = LoopResult(step=0, optimizer=strategy.optimizer_name)
    resume = ckpt.resume_point(cfg.train)
    if resume:
        _restore(strategy, loader, skips, resume, rank, result)
    tracker = make_tracker(cfg.tracking, run_id, rank)
    # the first worker of each node samples the node's CPUs, memory and GPUs into the run
    monitor = (start_node_monitor(cfg.tracking, run_id, int(os.environ.get("NODE_RANK", 0)), cfg.cluster.nodes)
               if int(os.environ.get("LOCAL_RANK", rank)) == 0 else None)
    try:
        job = _Job(cfg, strategy, task, processor, loader, skips, tracker, rank, world, total, accum,
                   strategy.numel())
        _train_steps(job, result, on_step, on_checkpoint, stop_after)
        if on_end is not None:
            on_end(strategy, processor)
    finally:
        stop_node_monitor(monitor)
        tracker.close()  # also after a failure: what was logged up to it reaches the run
    result.skipped = dict(loader.skipped)
    return result


@dataclass
class _Job:
    """What the steps of one training job work with (built once by run_training)."""

    cfg: TrainJobConfig
    strategy: DeepSpeedStrategy
    task: Any
    processor: Any
    loader: Any
    skips: Any
    tracker: Any
    rank: int
    world: int
    total: int  # optimizer steps of the stage
    accum: int  # micro-batches per optimizer step on each rank
    n_params: int


def _train_steps(job: _Job, result: LoopResult, on_step, on_checkpoint, stop_after: Optional[int]) -> None:
    """Optimizer steps until ``total`` (or ``stop_after``): forward/backward of every micro-batch,
    one all-reduce of what the step logs, metrics, checkpoints."""
    from aov_dist.tracking.mlflow_tracker import CHECKPOINT_TAG

    cfg, strategy, task, loader, rank = job.cfg, job.strategy, job.task, job.loader, job.rank
    total, accum = job.total, job.accum

    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # epoch done: the loader advanced its epoch, start the next one
            batches = iter(loader)
            return next(batches)

    strategy.train_mode()
    while result.step < total:
        t0 = time.perf_counter()
        loss_sum: Any = 0.0  # a device tensor after the first micro-batch: no host sync per micro-batch
        tokens = 0
        for _ in range(accum):
            batch = next_batch()
            tokens += task.count_tokens(batch)  # on the host batch, before it moves
            loss = task.loss(strategy, strategy.to_device(batch))
            strategy.backward(loss)
            strategy.step()
            loss_sum = loss_sum + loss.detach().float()
        result.step += 1
        totals = _step_totals(strategy, loss_sum, accum, tokens, loader.skipped, job.world)
        result.losses.append(totals.loss)
        elapsed = time.perf_counter() - t0
        metrics = {"loss": totals.loss, "epoch": loader.epoch,
                   "samples_per_s": cfg.stage.global_batch_size / elapsed,
                   "tokens_per_s": totals.tokens / elapsed}
        norm = strategy.grad_norm()
        if norm is not None:
            metrics["grad_norm"] = norm
        metrics.update({f"lr/{k}": v for k, v in strategy.group_lrs().items()})
        # summed over ranks (every rank reads other shards): the job's bad samples, not rank 0's
        metrics.update({f"data/skipped_{k}": v for k, v in totals.skipped.items() if v})
        window = job.skips.update(result.step, result.step * cfg.stage.global_batch_size, totals.skipped)
        if window is not None:
            metrics["data/skipped_fraction"] = window.fraction
        mfu = _mfu(cfg, job.n_params, metrics["tokens_per_s"], job.world)
        if mfu is not None:
            metrics["mfu"] = mfu
        if rank == 0 and result.step % cfg.train.log_every_steps == 0:
            job.tracker.log_metrics(metrics, result.step)
        if on_step and rank == 0:
            on_step({"step": result.step, "total": total, **metrics})
        if result.step % cfg.train.checkpoint_every_steps == 0 or result.step == total:
            path = _save(cfg, strategy, job.processor, loader, result, rank, job.world, job.skips)
            result.checkpoints.append(path)
            if rank == 0:
                job.tracker.set_tag(f"{CHECKPOINT_TAG}{result.step}", path)
            if on_checkpoint:
                on_checkpoint(result.step, path, metrics)
        if stop_after is not None and result.step >= stop_after:
            break


def _mfu(cfg: TrainJobConfig, n_params: int, tokens_per_s: float, world: int) -> Optional[float]:
    """Model FLOPs utilisation (6 N flops per token: forward + backward), GPU runs only: on CPU
    there is no meaningful peak to divide by."""
    peak = cfg.train.peak_flops_per_device
    if not (cfg.cluster.use_gpu and peak > 0 and tokens_per_s > 0):
        return None
    return 6.0 * n_params * tokens_per_s / (peak * world)


def quiet_library_warnings() -> None:
    """torch.distributed deprecation notices fire on every ZeRO collective: keep the logs readable."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")


def _restore(strategy, loader, skips, path: str, rank: int, result: LoopResult) -> None:
    local, fetched = _fetch_own_state(strategy, path, rank)
    try:
        strategy.load(f"{local}/ds")
    finally:
        if fetched is not None:
            shutil.rmtree(local, ignore_errors=True)
    loader.load_state_dict(ckpt.read_json(f"{path}/loader/rank_{rank}.json"))
    ckpt.set_rng_state(ckpt.read_json(f"{path}/rng/rank_{rank}.json"))
    state = ckpt.read_json(f"{path}/trainer_state.json")
    skips.load_state_dict(state.get("skip_window", {}))
    result.step, result.losses, result.resumed_from = state["step"], list(state["losses"]), path
    result.restored_bytes = fetched or 0
    log.info("rank %d resumed from %s at step %d", rank, path, result.step)


def _fetch_own_state(strategy, path: str, rank: int) -> tuple[str, Optional[int]]:
    """DeepSpeed reads local files. From remote storage each rank downloads only the files it
    loads (its own ZeRO partitions: 1/world of the state), not the whole ds/ folder. Returns the
    local step folder and the bytes downloaded (None: the checkpoint was local already)."""
    if not storage.is_remote(path):
        return path, None
    tmp = tempfile.mkdtemp(prefix="aov-resume-")
    state = f"{path}/ds/{strategy.TAG}"
    fetched = 0
    try:
        for name in strategy.files_of_rank(storage.list_names(state), rank):
            fetched += storage.download(f"{state}/{name}", f"{tmp}/ds/{strategy.TAG}/{name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, fetched


def _save(cfg: TrainJobConfig, strategy, processor, loader, result: LoopResult, rank: int,
          world: int, skips=None) -> str:
    """Every rank writes its part; after a barrier rank 0 writes the marker, then prunes old ones."""
    storage_path, run = cfg.train.storage_path, cfg.train.run_name
    final = ckpt.step_dir(storage_path, run, result.step)
    remote = storage.is_remote(final)
    local = tempfile.mkdtemp(prefix="aov-ckpt-") if remote else final
    os.makedirs(local, exist_ok=True)
    strategy.save(f"{local}/ds")
    os.makedirs(f"{local}/loader", exist_ok=True)
    os.makedirs(f"{local}/rng", exist_ok=True)
    ckpt.write_json(f"{local}/loader/rank_{rank}.json", loader.state_dict())
    ckpt.write_json(f"{local}/rng/rank_{rank}.json", ckpt.rng_state())
    if cfg.train.export_hf_in_checkpoints:
        strategy.save_hf(f"{local}/hf", processor)  # collective; rank 0 writes
    if rank == 0:
        ckpt.write_json(f"{local}/trainer_state.json", {"step": result.step, "losses": result.losses,
                                                        "epoch": loader.epoch, "world_size": world,
                                                        "skip_window": skips.state_dict() if skips else {}})
        # the job's resolved config: aov-export rebuilds the model from it (no hf/ needed)
        # (redacted: a secret-looking key, e.g. a judge API key, must not land in storage)
        storage.write_bytes(f"{local}/{ckpt.CONFIG_FILE}", _safe_yaml(cfg).encode())
    if remote:  # each rank uploads what it wrote; a failed upload fails the step before any marker
        try:
            _upload(local, final, rank)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    strategy.barrier()
    if rank == 0:
        ckpt.write_marker(final, result.step, world)
        ckpt.prune(storage_path, run, cfg.train.keep_checkpoints)
    strategy.barrier()
    return final


def _safe_yaml(cfg: TrainJobConfig) -> str:
    from aov_dist.tracking.redact import redact

    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))


def _upload(local: str, final: str, rank: int) -> None:
    """Each rank's part of a remote checkpoint. botocore retries every request (storage.py); a
    copy that still fails fails the step, naming the target: no marker is written, so the previous
    checkpoint stays the newest committed one."""
    try:
        storage.copy_from_local(local, final)
    except Exception as e:
        raise RuntimeError(f"checkpoint {final}: rank {rank} could not upload its part ({type(e).__name__}: {e}; "
                           f"each request was tried {storage.WRITE_ATTEMPTS} times); the step is not committed, "
                           f"the previous checkpoint stays the newest") from e


def worker_entry(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train

    cfg = to_typed(config["cfg"])
    restarted_from = _reported_checkpoint()
    if restarted_from:
        # Ray restarted the worker group after a failure (FailureConfig.max_failures): continue
        # from the newest checkpoint this job committed, not from where the job first started.
        log.warning("worker group restarted: resuming from %s", restarted_from)
        cfg.train.resume_from = restarted_from
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    progress = config.get("progress")

    def on_step(m: dict) -> None:
        if progress is not None:
            # fire and forget: Queue.put_nowait waits for the queue actor's answer (a round trip
            # per step); a lost progress update only delays the driver's bar
            progress.actor.put_nowait.remote(m)

    def on_checkpoint(step: int, path: str, metrics: dict) -> None:
        # Ray gets a pointer checkpoint (our folder is the real one): cheap, and resume stays ours.
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "pointer.txt"), "w") as f:
                f.write(path)
            chk = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({"step": step, "loss": metrics["loss"], "checkpoint_uri": path}, checkpoint=chk)

    result = run_training(cfg, rank, world, run_id=config.get("run_id"), on_step=on_step, on_checkpoint=on_checkpoint)
    if rank == 0 and progress is not None:
        progress.put_nowait({"done": True, "losses": result.losses, "skipped": result.skipped,
                             "checkpoints": result.checkpoints, "resumed_from": result.resumed_from})


def _reported_checkpoint() -> Optional[str]:
    """The step folder of the newest checkpoint this job reported to Ray (a pointer), if any.
    Ray hands it back only when it restarts the workers of a running job."""
    import ray.train

    chk = ray.train.get_checkpoint()
    if chk is None:
        return None
    with chk.as_directory() as d:
        pointer = os.path.join(d, "pointer.txt")
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            return f.read().strip() or None
