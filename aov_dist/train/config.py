"""Stage, training-run and DeepSpeed sections of the config schema (conf/stage, conf/deepspeed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

STAGES = ("stage1", "stage2")
SCHEDULES = ("cosine_restarts", "warmup_cosine", "constant")


@dataclass
class StageConfig:
    # stage1: the expert alone on image labels; stage2: projector + LLM on conversations.
    name: str = "stage1"
    epochs: float = 2.0
    # > 0 caps the run at this many optimizer steps (tests, smoke runs).
    max_steps: int = -1
    global_batch_size: int = 128
    # Learning rate per trainable group of the stage (the model's stage_parameter_groups names).
    # Empty by default: Hydra merges dicts key by key, so a default here would leak into every stage.
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    schedule: str = "cosine_restarts"  # stage 1; warmup_cosine for stage 2; or constant
    restart_every_epochs: float = 0.5  # cosine_restarts: a warm restart this often
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # Stage 2 starts from a stage-1 result: a committed step folder, an HF-format folder, or an
    # expert .pth (released pretrained_expert_*.pth). None: the model section's weights as they are.
    init_from: Optional[str] = None
    # Stage 2 from a random expert makes the adverb text meaningless: demand an init source
    # (stage.init_from, model.expert_path or model.pretrained_path) unless this is switched off.
    require_init: bool = False


@dataclass
class TrainConfig:
    # The run's identity: checkpoints live in <storage_path>/<run_name>/step_<N>/ and a job with the
    # same run name continues from the newest committed one.
    run_name: str = "aov-tiny"
    storage_path: str = "ray_results"
    seed: int = 0
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    # Pruning also keeps every checkpoint the evaluation watcher has not scored yet (its aov.eval.<N>
    # tag is not done), and the best one by this evaluation metric (e.g.
    # eval/detection/class_mean/f1; higher is better unless the name says loss). Both need tracking.
    keep_unevaluated: bool = False
    keep_best: Optional[str] = None
    resume: bool = True
    # Resume from this committed step folder instead of discovering the newest one.
    resume_from: Optional[str] = None
    # Write a consolidated HF-format model into every checkpoint (hf/): what the evaluator loads.
    export_hf_in_checkpoints: bool = True
    log_every_steps: int = 1
    # Peak bf16 FLOP/s of one accelerator for the MFU metric; 0 = not logged (CPU).
    peak_flops_per_device: float = 0.0
    # Progress watchdog (train/watchdog.py): a worker whose step, checkpoint save or final save
    # makes no progress for step_timeout_s seconds writes every thread's stack to its log and to
    # the MLflow run, then exits, so Ray Train restarts the group from the last committed
    # checkpoint (cluster.max_failures). None = max(10 x the median step, min_step_timeout_s).
    watchdog: bool = True
    step_timeout_s: Optional[float] = None
    min_step_timeout_s: float = 300.0
    # the limit until the first step is done: building the model, loading a checkpoint, the first
    # step with its one-off compilation. The collectives' timeout is the larger limit plus a minute.
    startup_timeout_s: float = 1800.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    # 0 partitions even tiny parameters (tests really exercise ZeRO-3); DeepSpeed's default is 1e5.
    param_persistence_threshold: int = 100000
    # Construct the model under zero.Init (ZeRO-3) so no rank ever holds the whole model.
    zero_init: bool = True
