"""Deterministic read plans of the streaming loader: which sample stands at each place of an epoch.

Everything here is a pure function of the manifests (sample counts per shard) and integers (seed,
epoch, global and micro batch size, block size, positions): no image is touched. That is what makes
the order independent of the number of ranks and DataLoader workers, and a resume exact on any of
them: the order is known before reading, so (epoch, global batches done) describes progress.

Vocabulary:

* block: up to ``block_size`` consecutive samples of one shard (a shard's last block may be
  shorter). Blocks are what keeps reads shard-local: a block is one run of one tar.
* pass: one walk over all of a dataset's samples: its blocks in a seeded order, the samples of each
  block in a seeded order of their own (seed, kind, dataset, epoch, repeat[, block]).
* lane: a global batch has ``lanes = global_batch_size / micro_batch_size`` micro-batch places;
  place u of every global batch is read from lane u. Each pass of a dataset is cut into ``lanes``
  equal contiguous ranges, one per lane (``total // lanes`` samples; the remainder is left out of
  that pass). A lane is an endless sequence of positions; with several datasets, each position
  draws a dataset by weight (seeded per lane, chunked so any draw can be recomputed) and takes
  that dataset's next sample of its range. Each dataset keeps its own position in the lane; one
  drawn more often than its range allows goes on in its next pass (repeat 1, 2, ...).
* kind: ``MAIN`` is the epoch's sequence; ``REFILL`` is a second sequence built the same way from
  independent seeds, which supplies replacements for bad and filtered samples.
* span: micro-batch place u of global batch g reads lane u's main positions ``span(g)``: the
  epoch's ``lane_positions`` spread evenly over its global batches (``micro_batch_size`` positions
  each when every sample is expected usable; about ``micro_batch_size / share`` in stage 1, share =
  the manifests' labelled share).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, IO, Optional

import numpy as np

from aov_dist import storage

MANIFEST_FORMAT = "aov-shards"
MAIN, REFILL = 0, 1
# mixture draws are generated in chunks so that draw j can be recomputed without the ones before it
DRAW_CHUNK = 4096
# distinct constants keep the RNG streams of different purposes independent
_BLOCK_ORDER, _IN_BLOCK, _MIXTURE = 11, 13, 17


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
    # normal + anomalous from the manifest totals: the samples stage 1 expects to use
    labelled: int


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
    labelled = min(total, int(labels.get("normal", 0)) + int(labels.get("anomalous", 0)))
    return DatasetIndex(name, manifest_url, tuple(shards), total, labelled)


def load_manifest(manifest_url: str, name: str, open_url: Callable[[str], IO[bytes]]) -> DatasetIndex:
    with open_url(manifest_url) as f:
        text = f.read().decode("utf-8")
    return parse_manifest(text, manifest_url, name)


@dataclass(frozen=True)
class EpochPlan:
    """Per-epoch sizes, identical for every layout (computed from the manifests only)."""

    lanes: int  # micro-batch places of a global batch
    micro_batch_size: int
    global_batches: int  # per epoch
    lane_positions: int  # main-sequence positions of each lane read per epoch
    usable: int  # planned usable samples per epoch, all ranks
    dropped: int  # samples of one pass over every dataset that no span reads

    def span(self, g: int) -> tuple[int, int]:
        """Main-sequence positions [lo, hi) of a lane that global batch g reads."""
        n, length = self.global_batches, self.lane_positions
        return g * length // n, (g + 1) * length // n


def plan_epoch(indexes: list[DatasetIndex], weights: list[float], stage: str, global_batch_size: int,
               micro_batch_size: int, samples_per_epoch: Optional[int]) -> EpochPlan:
    lanes = global_batch_size // micro_batch_size
    for ix in indexes:
        if ix.total < lanes:
            raise ValueError(f"dataset {ix.name!r} ({ix.manifest_url}): {ix.total} samples is fewer "
                             f"than the micro-batch places of a global batch (global_batch_size / "
                             f"micro_batch_size = {lanes}): lower stage.global_batch_size or add data")
        if stage == "stage1" and ix.labelled == 0:
            raise ValueError(f"dataset {ix.name!r} ({ix.manifest_url}): its manifest counts no "
                             "labelled samples (totals.labels), stage 1 cannot use it: leave it "
                             "out of data.datasets for stage 1")
    # the share of read samples expected usable: every one in stage 2, the labelled share in
    # stage 1 (a mixture's share follows the weights, which decide what is drawn)
    share = Fraction(1)
    if stage == "stage1":
        w = [Fraction(x) for x in weights]
        share = sum((wi * Fraction(ix.labelled, ix.total) for wi, ix in zip(w, indexes)), Fraction(0)) / sum(w)
    if samples_per_epoch is not None:
        usable = samples_per_epoch
    else:
        usable = sum(ix.labelled if stage == "stage1" else ix.total for ix in indexes)
    global_batches = usable // global_batch_size
    if global_batches == 0:
        raise ValueError(f"an epoch has {usable} usable samples ({stage}), fewer than one global batch "
                         f"(stage.global_batch_size={global_batch_size}): lower it or add data")
    lane_positions = int(usable / share) // lanes
    dropped = max(0, sum(ix.total for ix in indexes) - lane_positions * lanes)
    return EpochPlan(lanes, micro_batch_size, global_batches, lane_positions, usable, dropped)


def dataset_blocks(index: DatasetIndex, block_size: int) -> np.ndarray:
    """[n_blocks, 3] (shard index, first member, samples) of a dataset's blocks in shard order."""
    rows = [(si, a, min(block_size, s.samples - a)) for si, s in enumerate(index.shards)
            for a in range(0, s.samples, block_size)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


class PassOrder:
    """The order of one pass over one dataset: random access from pass position to sample."""

    def __init__(self, blocks: np.ndarray, seed: int, kind: int, ds_idx: int, epoch: int, repeat: int):
        self.blocks, self._key = blocks, [seed, _IN_BLOCK, kind, ds_idx, epoch, repeat]
        self.order = np.random.default_rng([seed, _BLOCK_ORDER, kind, ds_idx, epoch, repeat]).permutation(
            len(blocks))
        self.starts = np.concatenate([[0], np.cumsum(blocks[self.order, 2])])

    def block_at(self, p: int) -> int:
        """Place k (in this pass's block order) of the block holding pass position p."""
        return int(np.searchsorted(self.starts, p, side="right")) - 1

    def members(self, k: int) -> np.ndarray:
        """Members (ordinals in the shard) of the k-th block of the pass, in pass order."""
        b = int(self.order[k])
        shard, first, size = (int(x) for x in self.blocks[b])
        return first + np.random.default_rng(self._key + [b]).permutation(size)


@dataclass(frozen=True)
class Place:
    """Where a dataset-lane position stands: its block, the block's members this lane reads (in
    lane order) and the index of the position among them."""

    block: tuple[int, int]  # (repeat, place of the block in the pass)
    shard: int
    members: np.ndarray
    offset: int

    @property
    def member(self) -> int:
        return int(self.members[self.offset])


class DatasetLanePlan:
    """One dataset's positions in one lane of one sequence (main or refill) of an epoch."""

    def __init__(self, blocks: np.ndarray, total: int, seed: int, kind: int, ds_idx: int, epoch: int,
                 lane: int, lanes: int):
        self.blocks, self.seed, self.kind, self.ds_idx, self.epoch = blocks, seed, kind, ds_idx, epoch
        self.length = total // lanes  # samples of each pass in this lane
        self.lo = lane * self.length
        self._pass: Optional[tuple[int, PassOrder]] = None
        self._block: Optional[tuple[tuple[int, int], int, np.ndarray, int]] = None

    def _order(self, repeat: int) -> PassOrder:
        if self._pass is None or self._pass[0] != repeat:
            self._pass = (repeat, PassOrder(self.blocks, self.seed, self.kind, self.ds_idx, self.epoch,
                                            repeat))
        return self._pass[1]

    def place(self, q: int) -> Place:
        repeat, r = divmod(q, self.length)
        p = self.lo + r
        order = self._order(repeat)
        k = order.block_at(p)
        if self._block is None or self._block[0] != (repeat, k):
            # the part of the block inside this lane's range, in pass order
            start, stop = int(order.starts[k]), int(order.starts[k + 1])
            lo, hi = max(start, self.lo), min(stop, self.lo + self.length)
            shard = int(self.blocks[order.order[k], 0])
            self._block = ((repeat, k), shard, order.members(k)[lo - start:hi - start], lo)
        block, shard, members, lo = self._block
        return Place(block, shard, members, p - lo)


class LaneDraws:
    """Which dataset each position of a lane takes, and that dataset's position in the lane."""

    def __init__(self, weights: list[float], seed: int, kind: int, epoch: int, lane: int):
        p = np.asarray(weights, dtype=np.float64)
        self.p, self._key = p / p.sum(), [seed, _MIXTURE, kind, epoch, lane]
        self._before = [np.zeros(len(p), dtype=np.int64)]  # draws per dataset before chunk c
        self._chunk: Optional[tuple[int, np.ndarray, np.ndarray]] = None

    def _draws(self, c: int) -> np.ndarray:
        return np.random.default_rng(self._key + [c]).choice(len(self.p), size=DRAW_CHUNK, p=self.p)

    def at(self, i: int) -> tuple[int, int]:
        """(dataset, its position in the lane) of lane position i."""
        c, j = divmod(i, DRAW_CHUNK)
        if self._chunk is None or self._chunk[0] != c:
            while len(self._before) <= c:
                n = len(self._before) - 1
                self._before.append(self._before[n] + np.bincount(self._draws(n), minlength=len(self.p)))
            d = self._draws(c)
            # draws of each dataset before each place of the chunk
            seen = np.cumsum(np.eye(len(self.p), dtype=np.int64)[d], axis=0) - np.eye(len(self.p), dtype=np.int64)[d]
            self._chunk = (c, d, seen)
        _, d, seen = self._chunk
        ds = int(d[j])
        return ds, int(self._before[c][ds] + seen[j, ds])
