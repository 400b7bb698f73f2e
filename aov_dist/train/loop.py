"""The per-worker training loop: the same code on every rank, with or without Ray.

Every rank builds the model (under zero.Init for ZeRO-3), the DeepSpeed engine and its own shard
stream, runs the same modules the same number of times (ZeRO-3 hangs otherwise), and writes its
part of each checkpoint; rank 0 logs and commits.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from aov_dist.config import TrainJobConfig, micro_steps_per_step, to_typed
from aov_dist.train import checkpoint as ckpt
from aov_dist.train.goodput import Goodput, GoodputCounter, goodput_metrics
from aov_dist.train.watchdog import Watchdog, start_watchdog
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


@dataclass
class StepTotals:
    loss: float  # mean over ranks of each rank's mean micro-batch loss
    goodput: Goodput  # summed over ranks
    skipped: dict[str, int]  # per skip reason, summed over ranks (the job's bad samples)
    uploaded: int  # ranks whose part of the checkpoint in flight is uploaded (checkpointing.py)
    upload_failed: int  # ranks whose upload failed


def _step_totals(strategy: DeepSpeedStrategy, loss_sum: torch.Tensor, accum: int, goodput: Goodput,
                 skipped: dict[str, int], upload_status: list[float], world: int) -> StepTotals:
    """One all-reduce per step for every number the step needs from all ranks (a round trip each
    otherwise). A fixed reason list keeps the tensor the same size on every rank."""
    from aov_dist.data.decode import SKIP_REASONS

    ledger = goodput.as_list()
    v = strategy.reduce_step_totals(loss_sum, [*ledger, *(float(skipped.get(k, 0)) for k in SKIP_REASONS),
                                               *upload_status])
    g, n = 1 + len(ledger), len(SKIP_REASONS)
    return StepTotals(v[0] / accum / world, Goodput.from_list(v[1:g]),
                      {k: int(c) for k, c in zip(SKIP_REASONS, v[g:g + n])}, int(v[g + n]), int(v[g + n + 1]))


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
    DeepSpeed engine: every step, save and load goes through the strategy. A watchdog
    (train/watchdog.py) ends the process, with a stack report, when a phase stalls.
    """
    from aov_dist.tracking.mlflow_tracker import text_reporter

    quiet_library_warnings()
    strategy = strategy or DeepSpeedStrategy(cfg)
    strategy.init_distributed()
    watch = start_watchdog(cfg.train, rank, text_reporter(cfg.tracking, run_id))
    try:
        return _run(cfg, rank, world, run_id, on_step, on_checkpoint, task, stop_after, on_end, strategy, watch)
    finally:
        watch.stop()


def _run(cfg: TrainJobConfig, rank: int, world: int, run_id, on_step, on_checkpoint, task, stop_after, on_end,
         strategy: DeepSpeedStrategy, watch: Watchdog) -> LoopResult:
    from aov_dist.data.skip_policy import SkipPolicy
    from aov_dist.tracking.mlflow_tracker import CHECKPOINT_TAG, make_tracker, steps_to_keep
    from aov_dist.train.checkpointing import CheckpointWriter, restore, run_hooks
    from aov_dist.tracking.system_metrics import start_node_monitor, stop_node_monitor

    watch.phase("building the model and the engine")
    ckpt.seed_everything(cfg.train.seed)
    task = task or make_task(cfg.stage.name)
    model, processor = strategy.build_model(lambda: task.build_model(cfg, gather=strategy.gathered_for_update))
    train_tower = "vision_tower" in cfg.stage.lr
    groups = model.stage_parameter_groups(cfg.stage.name, train_vision_tower=train_tower)
    count = GoodputCounter(model.config, cfg.stage.name, train_tower)

    accum = micro_steps_per_step(cfg, world)
    loader = task.build_loader(cfg, processor, rank, world)
    steps_per_epoch = max(1, loader.batches_per_epoch // accum)
    total = cfg.stage.max_steps if cfg.stage.max_steps > 0 else max(1, math.floor(cfg.stage.epochs * steps_per_epoch))
    resume = ckpt.resume_point(cfg.train)
    strategy.initialize(model, groups, total, steps_per_epoch,
                        load_universal=bool(resume) and ckpt.written_by(resume) != world)
    del model  # from here on the engine owns it
    skips = SkipPolicy(cfg.data.skip_window, cfg.data.max_skip_fraction, cfg.data.fail_skip_fraction)

    result = LoopResult(step=0, optimizer=strategy.optimizer_name)
    if resume:
        watch.phase(f"restoring {resume}")
        restore(strategy, loader, skips, resume, rank, result)
    tracker = make_tracker(cfg.tracking, run_id, rank)

    def committed(step: int, path: str, metrics: dict) -> None:
        result.checkpoints.append(path)
        if rank == 0:
            tracker.set_tag(f"{CHECKPOINT_TAG}{step}", path)

    writer = CheckpointWriter(cfg, strategy, processor, rank, world, run_hooks(committed, on_checkpoint),
                              keep_steps=lambda: steps_to_keep(cfg.tracking, run_id, cfg.train.keep_unevaluated,
                                                               cfg.train.keep_best))
    # the first worker of each node samples the node's CPUs, memory and GPUs into the run
    monitor = (start_node_monitor(cfg.tracking, run_id, int(os.environ.get("NODE_RANK", 0)), cfg.cluster.nodes)
               if int(os.environ.get("LOCAL_RANK", rank)) == 0 else None)
    try:
        job = _Job(cfg, strategy, task, loader, skips, tracker, writer, rank, world, total, accum, count, watch)
        _train_steps(job, result, on_step, stop_after)
        watch.phase("final save (the last checkpoint's upload and commit)")
        writer.finish()  # the last checkpoint's upload, then its commit
        if on_end is not None:
            watch.phase("end of training (on_end)")
            on_end(strategy, processor)
    finally:
        stop_node_monitor(monitor)
        # bounded on its own (tracking.close_wait_s for a restarting server): not a stall
        watch.stop()
        tracker.close()  # also after a failure: what was logged up to it reaches the run
    result.skipped = dict(loader.skipped)
    return result


@dataclass
class _Job:
    """What the steps of one training job work with (built once by run_training)."""

    cfg: TrainJobConfig
    strategy: DeepSpeedStrategy
    task: Any
    loader: Any
    skips: Any
    tracker: Any
    writer: Any  # checkpointing.CheckpointWriter
    rank: int
    world: int
    total: int  # optimizer steps of the stage
    accum: int  # micro-batches per optimizer step on each rank
    count: GoodputCounter  # a host batch's goodput ledger
    watch: Watchdog


def _train_steps(job: _Job, result: LoopResult, on_step, stop_after: Optional[int]) -> None:
    """Optimizer steps until ``total`` (or ``stop_after``): forward/backward of every micro-batch,
    one all-reduce of what the step logs and of the checkpoint upload states, metrics, checkpoints."""
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
        ledger = Goodput()
        n = result.step + 1
        for k in range(1, accum + 1):
            job.watch.phase(f"step {n}: reading micro-batch {k}/{accum}")
            batch = next_batch()
            ledger = ledger + job.count(batch)  # on the host batch, before it moves
            job.watch.phase(f"step {n}: forward/backward of micro-batch {k}/{accum}", collective=job.world > 1)
            loss = task.loss(strategy, strategy.to_device(batch))
            strategy.backward(loss)
            strategy.step()
            loss_sum = loss_sum + loss.detach().float()
        job.watch.phase(f"step {n}: the step's all-reduce", collective=True)
        result.step += 1
        totals = _step_totals(strategy, loss_sum, accum, ledger, loader.skipped, job.writer.status(), job.world)
        job.writer.settle(totals.uploaded, totals.upload_failed)  # commits an uploaded checkpoint
        job.watch.step_done(result.step)
        result.losses.append(totals.loss)
        elapsed = time.perf_counter() - t0
        metrics = {"loss": totals.loss, "epoch": loader.epoch,
                   **goodput_metrics(totals.goodput, elapsed, job.world, cfg.train.peak_flops_per_device,
                                     cfg.cluster.use_gpu)}
        norm = strategy.grad_norm()
        if norm is not None:
            metrics["grad_norm"] = norm
        metrics.update({f"lr/{k}": v for k, v in strategy.group_lrs().items()})
        # summed over ranks (every rank reads other shards): the job's bad samples, not rank 0's
        metrics.update({f"data/skipped_{k}": v for k, v in totals.skipped.items() if v})
        window = job.skips.update(result.step, result.step * cfg.stage.global_batch_size, totals.skipped)
        if window is not None:
            metrics["data/skipped_fraction"] = window.fraction
        if rank == 0 and result.step % cfg.train.log_every_steps == 0:
            job.tracker.log_metrics(metrics, result.step)
        if on_step and rank == 0:
            on_step({"step": result.step, "total": total, **metrics})
        if result.step % cfg.train.checkpoint_every_steps == 0 or result.step == total:
            job.watch.phase(f"step {n}: checkpoint save")
            job.writer.save(result.step, result.losses, loader, job.skips, metrics)
        if stop_after is not None and result.step >= stop_after:
            break


def quiet_library_warnings() -> None:
    """torch.distributed deprecation notices fire on every ZeRO collective: keep the logs readable."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")


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
