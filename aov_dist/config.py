"""The one typed config schema of a training job, registered in Hydra's ConfigStore.

conf/config.yaml composes the groups (model, data, stage, deepspeed, cluster, tracking, eval) on top
of ``TrainJobConfig``; Hydra rejects unknown keys and wrong types against these dataclasses, and
``validate`` checks the combinations on the driver before anything (Ray, MLflow) is started.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from aov_dist import CONF_DIR  # noqa: F401  (re-exported: the apps and tests read it from here)
from aov_dist.cluster.config import ClusterConfig, ClusterConfigError, validate_cluster
from aov_dist.data.config import DataConfig
from aov_dist.eval.config import EvalConfig
from aov_dist.model.config import ModelConfig
from aov_dist.tracking.config import TrackingConfig
from aov_dist.train.config import SCHEDULES, STAGES, DeepSpeedConfig, StageConfig, TrainConfig


class ConfigError(ClusterConfigError):
    """A config that cannot work; the message starts with the dotted key to fix (``.key``).
    The cluster section's own error is the same kind, so callers catch one type."""


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_job_schema", node=TrainJobConfig)


def to_typed(cfg: DictConfig | TrainJobConfig | dict[str, Any]) -> TrainJobConfig:
    """Merge onto the schema (unknown keys and wrong types fail here, naming the key) -> dataclasses."""
    if isinstance(cfg, TrainJobConfig):
        return cfg
    try:
        # via a plain container: a typed node merged into a typed node would silently drop keys
        # that a forced '+key=' override added, instead of failing on them
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(TrainJobConfig), cfg)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(str(getattr(e, "full_key", None) or "config"),
                          "must be set (the config marks it ??? and nothing gave it a value)") from e
    except Exception as e:  # omegaconf's errors carry full_key; surface it first
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(str(key), str(e).splitlines()[0]) from e


def micro_steps_per_step(cfg: TrainJobConfig, world: Optional[int] = None) -> int:
    """Gradient-accumulation steps: global batch = workers x micro batch x accumulation, on ``world``
    workers (default: the cluster's; fewer while an elastic job runs short of workers)."""
    world = cfg.cluster.num_workers if world is None else world
    return cfg.stage.global_batch_size // (world * cfg.data.micro_batch_size)


_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def training_precision(cfg: TrainJobConfig) -> str:
    """"bf16" or "fp32": the one rule for a training job's precision (DeepSpeed's bf16 switch and the
    dtype the model is built in). auto = bf16 on GPU clusters, fp32 on CPU ones."""
    if cfg.deepspeed.precision == "auto":
        return "bf16" if cfg.cluster.use_gpu else "fp32"
    return cfg.deepspeed.precision


def validate(cfg: DictConfig | TrainJobConfig | dict[str, Any], *, check_paths: bool = True) -> TrainJobConfig:
    """Typed, checked config, or one ConfigError naming the key. Touches no Ray / MLflow resource.
    ``check_paths=False`` skips the existence checks of input paths (the planner checks a job
    before its inputs exist, or with placeholders for the ones not given yet)."""
    c = to_typed(cfg)
    workers = c.cluster.num_workers
    per_step = workers * c.data.micro_batch_size
    if c.stage.name not in STAGES:
        raise ConfigError("stage.name", f"must be one of {STAGES}, got {c.stage.name!r}")
    if c.stage.schedule not in SCHEDULES:
        raise ConfigError("stage.schedule", f"must be one of {SCHEDULES}, got {c.stage.schedule!r}")
    if c.data.micro_batch_size < 1:
        raise ConfigError("data.micro_batch_size", f"must be >= 1, got {c.data.micro_batch_size}")
    if c.stage.global_batch_size < 1 or c.stage.global_batch_size % per_step:
        raise ConfigError(
            "stage.global_batch_size",
            f"{c.stage.global_batch_size} is not divisible by workers x micro batch = "
            f"{workers} x {c.data.micro_batch_size} = {per_step} (cluster.nodes x cluster.workers_per_node "
            f"x data.micro_batch_size)")
    uneven = [w for w in c.cluster.worker_counts if c.stage.global_batch_size % (w * c.data.micro_batch_size)]
    if uneven:
        raise ConfigError("cluster.min_workers", f"an elastic job may run on {uneven[0]} workers, and "
                          f"stage.global_batch_size={c.stage.global_batch_size} is not divisible by {uneven[0]} x "
                          f"data.micro_batch_size: raise cluster.min_workers or pick a global batch every "
                          f"count in {list(c.cluster.worker_counts)} divides")
    if len(c.cluster.worker_counts) > 1 and c.deepspeed.zero_stage != 3:
        raise ConfigError("cluster.min_workers", "an elastic job reshards its checkpoints for another "
                          "number of workers, which needs deepspeed.zero_stage=3")
    if not c.stage.lr:
        raise ConfigError("stage.lr", "give a learning rate per trainable group, e.g. {expert: 1e-4}")
    expected = {"stage1": {"expert"}, "stage2": {"projector", "llm"}}[c.stage.name]
    # stage 1 may also train a tower that has no pretrained weights (the tiny demo preset)
    optional = {"vision_tower"} if c.stage.name == "stage1" and not c.model.pretrained_path else set()
    if not expected <= set(c.stage.lr) <= expected | optional:
        raise ConfigError("stage.lr", f"{c.stage.name} trains the groups {sorted(expected)}"
                          + (f" (optionally {sorted(optional)})" if optional else "") + f", got {sorted(c.stage.lr)}")
    if c.stage.epochs <= 0 and c.stage.max_steps <= 0:
        raise ConfigError("stage.epochs", "must be > 0 (or set stage.max_steps)")
    if not 0.0 <= c.stage.warmup_ratio < 1.0:
        raise ConfigError("stage.warmup_ratio", f"must be in [0, 1), got {c.stage.warmup_ratio}")
    if c.data.packing and c.stage.name != "stage2":
        raise ConfigError("data.packing", f"packs conversations (stage2); {c.stage.name} has no text to pack")
    if c.stage.name == "stage2" and c.stage.require_init and not (
            c.stage.init_from or c.model.expert_path or c.model.pretrained_path):
        raise ConfigError("stage.init_from", "stage2 needs trained expert weights: a stage-1 checkpoint "
                          "(step folder or its hf/), an expert .pth, or model.pretrained_path / model.expert_path "
                          "(or stage.require_init=false for a random expert)")
    if c.stage.max_steps == 0 or c.stage.max_steps < -1:
        raise ConfigError("stage.max_steps", f"must be -1 (whole epochs) or >= 1, got {c.stage.max_steps}")
    if c.deepspeed.zero_stage not in (2, 3):
        raise ConfigError("deepspeed.zero_stage", f"must be 2 or 3, got {c.deepspeed.zero_stage}")
    if c.deepspeed.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("deepspeed.precision", f"must be auto, fp32 or bf16, got {c.deepspeed.precision!r}")
    if c.deepspeed.precision == "bf16" and not c.cluster.use_gpu:
        raise ConfigError("deepspeed.precision", "bf16 training needs GPUs (cluster.use_gpu=true); CPU runs fp32")
    if c.model.dtype != "auto" and _DTYPE_NAMES.get(c.model.dtype, c.model.dtype) != training_precision(c):
        raise ConfigError("model.dtype", f"{c.model.dtype!r} disagrees with the training precision "
                          f"{training_precision(c)!r} (deepspeed.precision={c.deepspeed.precision!r}, "
                          f"cluster.use_gpu={str(c.cluster.use_gpu).lower()}): leave model.dtype=auto for training")
    if c.model.preset != "tiny" and not (c.model.pretrained_path or c.model.random_init or c.stage.init_from):
        raise ConfigError("model.pretrained_path", f"model.preset={c.model.preset!r} loads its weights and Qwen2 "
                          "tokenizer from an HF-format directory (local or s3://); or model.random_init=true "
                          "for checks at these dimensions")
    if c.model.random_init and c.model.pretrained_path:
        raise ConfigError("model.random_init", "random weights and model.pretrained_path exclude each other: "
                          "drop one of them")
    if c.deepspeed.offload_params and c.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params", "parameter offload needs ZeRO-3 (deepspeed.zero_stage=3)")
    if c.train.checkpoint_every_steps < 1:
        raise ConfigError("train.checkpoint_every_steps", f"must be >= 1, got {c.train.checkpoint_every_steps}")
    if (c.train.keep_unevaluated or c.train.keep_best) and not c.tracking.enabled:
        key = "train.keep_unevaluated" if c.train.keep_unevaluated else "train.keep_best"
        raise ConfigError(key, "needs tracking (tracking.enabled=true): the evaluations are read from the MLflow run")
    for key in ("step_timeout_s", "min_step_timeout_s", "startup_timeout_s"):
        value = getattr(c.train, key)
        if value is not None and value <= 0:
            raise ConfigError(f"train.{key}", f"must be > 0 seconds, got {value}")
    if c.train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints", f"must be >= 1, got {c.train.keep_checkpoints}")
    if not c.train.run_name or "/" in c.train.run_name:
        raise ConfigError("train.run_name", f"must be a non-empty name without '/', got {c.train.run_name!r}")
    try:
        c.data.validate()
        validate_cluster(c.cluster, c.train.storage_path, storage_key="train.storage_path")
    except ValueError as e:
        key = getattr(e, "key", None) or str(e).split(":", 1)[0]
        raise ConfigError(key, str(e).split(": ", 1)[-1]) from e
    _check_url_schemes(c)
    if check_paths:
        _check_paths(c)
    return c


def _check_url_schemes(c: TrainJobConfig) -> None:
    """Every storage URL of the job is one aov_dist.storage can open (local, file://, s3://)."""
    from aov_dist import storage

    urls = [("train.resume_from", c.train.resume_from), ("model.pretrained_path", c.model.pretrained_path),
            ("model.expert_path", c.model.expert_path), ("stage.init_from", c.stage.init_from),
            *((f"data.datasets[{i}].manifest", d.manifest) for i, d in enumerate(c.data.datasets))]
    for key, url in urls:
        try:
            storage.check_url(url, key)
        except storage.UnsupportedURL as e:
            raise ConfigError(key, str(e).split(": ", 1)[1]) from e


def _check_paths(c: TrainJobConfig) -> None:
    """Inputs that must exist before any resource is taken (remote ones are checked through fsspec)."""
    from aov_dist import storage
    from aov_dist.train.checkpoint import is_committed

    for i, d in enumerate(c.data.datasets):
        if not storage.exists(d.manifest):
            raise ConfigError(f"data.datasets[{i}].manifest", f"{d.manifest!r} does not exist (make shards writes the synthetic one)")
    for key, path in (("model.pretrained_path", c.model.pretrained_path), ("model.expert_path", c.model.expert_path),
                      ("stage.init_from", c.stage.init_from)):
        if path and not storage.exists(path):
            raise ConfigError(key, f"{path!r} does not exist")
    if c.train.resume_from and not is_committed(c.train.resume_from):
        raise ConfigError("train.resume_from", f"{c.train.resume_from!r} is not a committed checkpoint (no COMMITTED marker)")


register_configs()
