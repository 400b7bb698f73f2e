"""Data section of the config schema (conf/data/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DatasetSpec:
    name: str = "synthetic"
    # manifest.json of a shard folder, local path or s3://
    manifest: str = "data_shards/synthetic/manifest.json"
    # relative sampling weight in the mixture
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    micro_batch_size: int = 2
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0
    max_length: int = 2048
    # skip: skip-and-count bad samples; fail: raise naming shard and key
    on_error: str = "skip"
    # S3 endpoint for s3:// URLs (credentials come from the environment only)
    s3_endpoint_url: Optional[str] = None
