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
    # DataLoader worker processes per rank; they share the rank's micro-batches (micro-batch t goes
    # to worker t % num_workers), the order of samples does not depend on them (0 = read in the
    # training process)
    num_workers: int = 1
    # batches each worker prepares ahead (DataLoader prefetch_factor; only with num_workers > 0)
    prefetch_factor: int = 2
    # how DataLoader workers start: None = the platform default (fork on Linux); "spawn" or
    # "forkserver" where forking a threaded process (e.g. a Ray worker) is a concern
    mp_context: Optional[str] = None
    # samples per block: every shard is cut into blocks of this many consecutive samples; an
    # epoch orders the blocks at random and the samples inside each block (1 = every sample its
    # own block: the most random order, one tar seek per sample)
    block_size: int = 64
    seed: int = 0
    # tokens per sample after image expansion (one AnyRes image at 384 px is up to ~9k tokens with
    # the official presets); longer samples are skipped and counted as too_long
    max_length: int = 2048
    # stage 2: lay each micro-batch's samples end to end in rows of up to max_length tokens
    # instead of padding every sample to the longest (data/packing.py); the samples of every
    # micro-batch, and so resume and the loss, stay what they are without packing
    packing: bool = False
    # skip: skip-and-count bad samples; fail: raise naming shard and key
    on_error: str = "skip"
    # Skipped samples (any reason, all ranks) are judged per window of skip_window samples read:
    max_skip_fraction: float = 0.01  # above it, a warning naming what to change
    fail_skip_fraction: float = 0.10  # above it, every rank stops naming the key to change
    skip_window: int = 1000
    # images whose width or height is smaller than this are treated as corrupt (1x1 placeholders)
    min_image_side: int = 2
    # usable samples per epoch on all ranks together (for a mixture); None = the datasets' sizes
    # (stage 1: their manifests' labelled samples)
    samples_per_epoch: Optional[int] = None
    # S3 endpoint for s3:// URLs (credentials come from the environment only);
    # None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment
    s3_endpoint_url: Optional[str] = None

    def validate(self) -> None:
        """Raise ValueError naming the offending key (data.<key>)."""
        if not self.datasets:
            raise ValueError("data.datasets: at least one dataset is required")
        names = [d.name for d in self.datasets]
        _require(len(set(names)) == len(names), "datasets", f"dataset names must be unique, got {names}")
        for i, d in enumerate(self.datasets):
            _require(bool(d.manifest), f"datasets[{i}].manifest", f"empty (dataset {d.name!r})")
            _require(d.weight > 0, f"datasets[{i}].weight", f"must be > 0, got {d.weight} (dataset {d.name!r})")
        rules = (
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("block_size", self.block_size >= 1, ">= 1 samples"),
            ("on_error", self.on_error in ON_ERROR_CHOICES, f"one of {ON_ERROR_CHOICES}"),
            ("mp_context", self.mp_context in (None, "fork", "spawn", "forkserver"), "null, fork, spawn or forkserver"),
            ("max_skip_fraction", 0.0 <= self.max_skip_fraction <= self.fail_skip_fraction <= 1.0,
             f"0 <= max_skip_fraction <= fail_skip_fraction <= 1 (fail_skip_fraction={self.fail_skip_fraction})"),
            ("skip_window", self.skip_window >= 1, ">= 1 samples"),
            ("max_length", self.max_length >= 16, ">= 16 tokens"),
            ("samples_per_epoch", self.samples_per_epoch is None or self.samples_per_epoch >= 1, ">= 1 or null"),
        )
        for key, ok, want in rules:
            _require(ok, key, f"must be {want}, got {getattr(self, key)!r}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"data.{key}: {message}")
