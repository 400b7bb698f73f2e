"""Data section of the config schema (conf/data/*.yaml).

The streaming reader (``aov_dist.data.stream``) is driven entirely by these fields; see that
module's docstring for what each one does to the order of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

ON_ERROR_CHOICES = ("skip", "fail")


@dataclass
class DatasetSpec:
    name: str = "synthetic"
    # manifest.json of a shard folder, local path or s3://; no default: a data group or the command
    # line gives it (``???`` in a group file stays missing and is reported naming this key)
    manifest: str = MISSING
    # relative sampling weight in the mixture
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    # samples per batch on one rank (the loader batches inside its workers)
    micro_batch_size: int = 2
    # DataLoader worker processes per rank; each one reads its own slice of the shards
    # (0 = read in the training process, one slice per rank)
    num_workers: int = 1
    # batches each worker prepares ahead (DataLoader prefetch_factor; only with num_workers > 0)
    prefetch_factor: int = 2
    # how DataLoader workers start: None = the platform default (fork on Linux); "spawn" or
    # "forkserver" where forking a threaded process (e.g. a Ray worker) is a concern
    mp_context: Optional[str] = None
    # shuffle buffer per worker stream, in samples (1 = no shuffle inside a slice)
    shuffle_buffer: int = 256
    seed: int = 0
    # tokens per sample after image expansion (one AnyRes image at 384 px is up to ~9k tokens with
    # the official presets); longer samples are skipped and counted as too_long
    max_length: int = 2048
    # skip: skip-and-count bad samples; fail: raise naming shard and key
    on_error: str = "skip"
    # Skipped samples (any reason, all ranks) per window of skip_window samples read: a warning
    # above max_skip_fraction, a failure naming the key to change above fail_skip_fraction.
    max_skip_fraction: float = 0.01
    fail_skip_fraction: float = 0.10
    skip_window: int = 1000
    # images whose width or height is smaller than this are treated as corrupt (1x1 placeholders)
    min_image_side: int = 2
    # samples per epoch on all ranks together for a mixture; None = sum of the datasets' sizes
    samples_per_epoch: Optional[int] = None
    # S3 endpoint for s3:// URLs (credentials come from the environment only);
    # None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment
    s3_endpoint_url: Optional[str] = None

    def validate(self) -> None:
        """Raise ValueError naming the offending key (data.<key>)."""
        if not self.datasets:
            raise ValueError("data.datasets: at least one dataset is required")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"data.datasets: dataset names must be unique, got {names}")
        for i, d in enumerate(self.datasets):
            if not d.manifest:
                raise ValueError(f"data.datasets[{i}].manifest: empty (dataset {d.name!r})")
            if not d.weight > 0:
                raise ValueError(f"data.datasets[{i}].weight: must be > 0, got {d.weight} "
                                 f"(dataset {d.name!r})")
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error: must be one of {ON_ERROR_CHOICES}, "
                             f"got {self.on_error!r}")
        if self.mp_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"data.mp_context: must be null, fork, spawn or forkserver, "
                             f"got {self.mp_context!r}")
        if not 0.0 <= self.max_skip_fraction <= self.fail_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction: need 0 <= max_skip_fraction <= fail_skip_fraction <= 1, "
                             f"got {self.max_skip_fraction} and {self.fail_skip_fraction}")
        if self.skip_window < 1:
            raise ValueError(f"data.skip_window: must be >= 1 samples, got {self.skip_window}")
        if self.max_length < 16:
            raise ValueError(f"data.max_length: must be >= 16 tokens, got {self.max_length}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch: must be >= 1 or null, "
                             f"got {self.samples_per_epoch}")
