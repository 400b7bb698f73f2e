"""Deterministic read plans for the streaming loader: which samples a worker reads, in what order.

Everything here is a pure function of the manifests (sample counts per shard) and integers
(seed, epoch, slot, ...): no image is touched. That is what makes the loader resumable and keeps
every rank's batch count equal: the order of samples is known before reading, so a position in
the order (an integer) is a complete description of progress, and the number of samples of each
rank is computed from the manifests alone.

Vocabulary:
* slot: one worker stream, ``slot = rank * streams_per_rank + worker``; there are
  ``world_size * streams_per_rank`` slots.
* pass: one walk over all of a dataset's samples. Per (dataset, epoch, repeat) the shards are put in
  a seeded order (the same on every rank), the concatenated sample sequence is cut into equal
  contiguous ranges, one per slot (the last ``total % slots`` samples are dropped), and each slot's
  range is shuffled by a simulated shuffle buffer. ``repeat`` > 0 are extra passes, used only to
  refill a slot whose samples ran out (bad samples, stage-1 filtering, mixture weights).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, IO, Optional

import numpy as np

from aov_dist import storage

MANIFEST_FORMAT = "aov-shards"
# mixture draws are generated in chunks so that draw j can be recomputed without the ones before it
DRAW_CHUNK = 4096
# distinct constants keep the RNG streams of different purposes independent
_SHARD_ORDER, _BUFFER, _MIXTURE = 11, 13, 17


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute (joined with the manifest's folder)
    samples: int


@dataclass(frozen=True)
class DatasetIndex:
    """What the loader needs from one manifest."""

    name: str
    manifest_url: str
    shards: tuple[ShardInfo, ...]
    total: int
    # (normal + anomalous) / samples from the manifest totals: the expected share of stage-1 samples
    labelled_fraction: float


def parse_manifest(text: str, manifest_url: str, name: str) -> DatasetIndex:
    """Validate a manifest.json (docs/architecture.md §2) and resolve its shard URLs."""
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"manifest {manifest_url} (dataset {name!r}): not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {manifest_url} (dataset {name!r}): 'format' must be "
                         f"{MANIFEST_FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    shards_raw = m.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise ValueError(f"manifest {manifest_url} (dataset {name!r}): 'shards' is empty or missing")
    base = storage.dirname_url(manifest_url)
    shards = []
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str) \
                or not isinstance(s.get("samples"), int) or s["samples"] < 0:
            raise ValueError(f"manifest {manifest_url} (dataset {name!r}): shards[{i}] needs a "
                             f"string 'url' and a non-negative integer 'samples', got {s!r}")
        try:
            url = storage.join_url(base, s["url"])
        except ValueError as e:
            raise ValueError(f"manifest {manifest_url} (dataset {name!r}): shards[{i}].url: {e} "
                             "(shard URLs must be relative to the manifest's folder)") from None
        shards.append(ShardInfo(url, s["samples"]))
    total = sum(s.samples for s in shards)
    labels = (m.get("totals") or {}).get("labels") or {}
    labelled = int(labels.get("normal", 0)) + int(labels.get("anomalous", 0))
    frac = min(1.0, labelled / total) if total else 0.0
    return DatasetIndex(name, manifest_url, tuple(shards), total, frac)


def load_manifest(manifest_url: str, name: str, open_url: Callable[[str], IO[bytes]]) -> DatasetIndex:
    with open_url(manifest_url) as f:
        text = f.read().decode("utf-8")
    return parse_manifest(text, manifest_url, name)


def slot_samples(index: DatasetIndex, num_slots: int) -> int:
    """Samples in each slot's range of one pass (equal for all slots)."""
    return index.total // num_slots


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of ``buffer`` samples fed 0..n-1 in read order.

    Same behaviour as webdataset's shuffle: fill the buffer, then emit a random element and put the
    next read sample in its place; drain the rest in random order. Simulated on indices, so the
    reader can reproduce it exactly and resume at any position.
    """
    out = np.empty(n, dtype=np.int64)
    u = rng.random(n)
    buf: list[int] = []
    k = 0
    for i in range(n):
        if len(buf) < buffer:
            buf.append(i)
            continue
        j = int(u[i] * len(buf))
        out[k] = buf[j]
        buf[j] = i
        k += 1
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[k:] = tail
    return out


@dataclass
class PassPlan:
    """One slot's part of one pass over one dataset."""

    # contiguous pieces of shards in read order: (shard index, first member, stop member)
    segments: list[tuple[int, int, int]]
    # first read position of each segment (read positions number the slot's samples 0..n-1)
    seg_start: list[int]
    # emission order: order[k] is the read position of the k-th sample handed out
    order: np.ndarray

    @property
    def length(self) -> int:
        return len(self.order)


def plan_pass(index: DatasetIndex, ds_idx: int, seed: int, epoch: int, repeat: int,
              slot: int, num_slots: int, buffer: int) -> PassPlan:
    n = slot_samples(index, num_slots)
    # the shard order must be identical on every rank: it depends on nothing rank-specific
    perm = np.random.default_rng([seed, _SHARD_ORDER, ds_idx, epoch, repeat]).permutation(
        len(index.shards))
    lo, hi = slot * n, (slot + 1) * n
    segments, seg_start = [], []
    pos = 0  # global position of the current shard's first sample in this pass
    for si in perm:
        cnt = index.shards[si].samples
        a, b = max(lo, pos), min(hi, pos + cnt)
        if a < b:
            seg_start.append(a - lo)
            segments.append((int(si), a - pos, b - pos))
        pos += cnt
        if pos >= hi:
            break
    rng = np.random.default_rng([seed, _BUFFER, ds_idx, epoch, repeat, slot])
    return PassPlan(segments, seg_start, shuffle_buffer_order(n, buffer, rng))


def mixture_draws(weights: list[float], seed: int, epoch: int, slot: int,
                  start: int, count: int) -> np.ndarray:
    """Dataset index for draws start..start+count-1 of a slot in an epoch (seeded, random access)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    out = []
    c0, c1 = start // DRAW_CHUNK, (start + count - 1) // DRAW_CHUNK
    for c in range(c0, c1 + 1):
        rng = np.random.default_rng([seed, _MIXTURE, epoch, slot, c])
        out.append(rng.choice(len(p), size=DRAW_CHUNK, p=p))
    flat = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
    off = start - c0 * DRAW_CHUNK
    return flat[off:off + count]


@dataclass(frozen=True)
class EpochBudget:
    """Per-epoch sizes, identical on every rank (computed from the manifests only)."""

    samples_per_slot: int  # good samples each worker stream hands out per epoch
    batches_per_stream: int
    batches_per_rank: int
    dropped_per_epoch: int  # samples of one pass not used (split + batch remainders), all ranks


def epoch_budget(indexes: list[DatasetIndex], num_slots: int, streams_per_rank: int,
                 batch_size: int, stage: str, samples_per_epoch: Optional[int]) -> EpochBudget:
    per_ds = []
    for ix in indexes:
        n = slot_samples(ix, num_slots)
        if n == 0:
            raise ValueError(f"dataset {ix.name!r} ({ix.manifest_url}): {ix.total} samples is fewer "
                             f"than ranks x workers = {num_slots} streams")
        if stage == "stage1" and ix.labelled_fraction == 0:
            raise ValueError(f"dataset {ix.name!r} ({ix.manifest_url}): its manifest counts no "
                             "labelled samples (totals.labels), stage 1 cannot use it: leave it "
                             "out of data.datasets for stage 1")
        # stage 1 uses only labelled samples: expect the manifest's labelled share of each slice
        per_ds.append(int(n * ix.labelled_fraction + 1e-9) if stage == "stage1" else n)
    if samples_per_epoch is not None:
        per_slot = samples_per_epoch // num_slots
    else:
        per_slot = sum(per_ds)
    q = per_slot // batch_size
    if q == 0:
        raise ValueError(f"an epoch has {per_slot} usable samples per stream ({stage}, "
                         f"{num_slots} streams), fewer than micro_batch_size={batch_size}: "
                         f"reduce ranks/num_workers/micro_batch_size or add data")
    used = q * batch_size * num_slots
    total = sum(ix.total for ix in indexes)
    return EpochBudget(q * batch_size, q, q * streams_per_rank, max(0, total - used))
