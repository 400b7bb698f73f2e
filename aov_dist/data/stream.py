"""Resumable, rank-balanced streaming loader over aov-shards (docs/architecture.md §1-§3).

Public API::

    loader = build_loader(cfg: DataConfig, rank: int, world_size: int,
                          transform=None,     # raw sample dict -> encoded (processor.encode_conversation)
                          collate=None,       # list[encoded] -> batch (processor.collate); default: list
                          stage="stage2",     # "stage1": labelled single-image samples only
                          state=None,         # a loader.state_dict() to continue from
                          too_long_exceptions=None)  # default: processor.ImageTokensExceedMaxLength
    for epoch in range(loader.epoch, num_epochs):
        for batch in loader:                  # yields exactly loader.batches_per_epoch batches
            ...
            ckpt["data"] = loader.state_dict()   # small JSON-able dict, per rank
    loader.skipped    # {reason: count} of bad samples, cumulative (decode.SKIP_REASONS)
    loader.filtered   # {reason: count} of stage-1 filtered samples (decode.FILTER_REASONS)
    loader.info()     # sizes for logging: batches_per_epoch, dropped_per_epoch, ...

With the model's processor use ``transforms.ConversationTransform(processor, max_length)`` (stage 2)
or ``transforms.ExpertTransform(processor)`` (stage 1) and ``collate=processor.collate``.

How order, balance and resume work (details in plan.py and reader.py):

* Each rank runs ``streams = max(1, num_workers)`` worker streams ("slots", ``rank * streams +
  worker``). Per epoch, each dataset's shards get a seeded order common to all ranks, the
  concatenated samples are cut into equal contiguous ranges, one per slot, and every slot shuffles
  its range with a simulated shuffle buffer (seed, dataset, epoch, slot). Shards are therefore read
  sequentially, by one slot each (at most two slots share a shard at range edges).
* Equal batch counts (ZeRO-3 hangs otherwise): every slot hands out the same number of good
  samples per epoch, ``batches_per_stream * micro_batch_size``, computed from the manifests alone;
  the remainder of the split and of the last batch is dropped (``info()["dropped_per_epoch"]``).
  A skipped bad sample is replaced by the slot's next planned sample; when the slot's range runs out
  it continues with a refill pass over the same range (a new shuffle, so a few samples repeat).
  Hence no rank can run short, and no per-step agreement between ranks is needed.
* Mixture: each handed-out position draws a dataset with probability ~ weight from a seeded stream
  (seed, epoch, slot); each dataset keeps its own position. An epoch has ``samples_per_epoch /
  slots`` samples per slot, default the sum of the datasets' ranges.
* Stage 1 keeps labelled single-image samples (multi-view and unlabelled ones are filtered and
  counted); its epoch size assumes the manifest's labelled share, refilling when a slot has fewer.
* Determinism with DataLoader workers: every worker yields its batches tagged with its logical
  stream and its state after the batch; the DataLoader hands batches out round-robin, batch ``i``
  from stream ``i % streams``, and the loader checks that. ``state_dict()`` keeps, per stream, the
  state after the last batch the *trainer received* (prefetched batches are not counted). On resume
  physical worker ``p`` plays stream ``(p + batches_done) % streams``, so the round-robin continues
  where it stopped: the remaining batches are exactly those of an uninterrupted run.
* Epochs: ``iter(loader)`` yields the rest of the current epoch, then advances ``loader.epoch``.
* A state is only valid for the same data config, seed, world size, rank and num_workers; any
  other combination is refused with a ValueError naming the field (never silently re-split).
* Bad samples (decode.py lists the reasons): ``on_error: skip`` counts them in ``loader.skipped``,
  ``fail`` raises ``decode.SampleError`` naming the shard URL and sample key. A tar that ends
  early or breaks is checked against the manifest's sample count, so lost samples are counted too.

Why our own tar reader instead of a webdataset pipeline: resuming exactly needs the order of
samples to be known before reading (positions, not buffers, are saved) and the split to be by
sample counts rather than whole shards (equal batches on every rank); webdataset's stages
(split_by_node, shuffle) keep their state inside the running iterator.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aov_dist import storage
from aov_dist.data.config import DataConfig
from aov_dist.data.plan import EpochBudget, epoch_budget, load_manifest
from aov_dist.data.reader import ReaderSettings, SlotReader, SlotState

STATE_VERSION = 1
STAGES = ("stage1", "stage2")


def list_collate(samples: list) -> list:
    """Default collate: the list of (transformed) samples."""
    return samples


def _identity(x: Any) -> Any:
    return x


def processor_too_long_exceptions() -> tuple[type[BaseException], ...]:
    """The processor's "image tokens alone exceed max_length" exception (dropped as too_long)."""
    from aov_dist.model.processor import ImageTokensExceedMaxLength

    return (ImageTokensExceedMaxLength,)


def _add(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    out = dict(total)
    for k, v in part.items():
        out[k] = out.get(k, 0) + int(v)
    return out


class _EpochDataset(IterableDataset):
    """The batches of one rank's remaining epoch; each DataLoader worker runs one stream."""

    def __init__(self, settings: ReaderSettings, rank: int, streams: int, epoch: int,
                 states: list[Optional[dict]], batches_done: int, batch_size: int,
                 batches_per_stream: int, collate: Callable[[list], Any]):
        super().__init__()
        self.settings, self.rank, self.streams, self.epoch = settings, rank, streams, epoch
        self.states, self.batches_done, self.batch_size = states, batches_done, batch_size
        self.batches_per_stream, self.collate = batches_per_stream, collate

    def __iter__(self) -> Iterator[tuple[int, int, dict, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.streams:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, loader planned "
                               f"{self.streams} streams")
        # the next batch is due from stream batches_done % streams: make physical worker 0 play it
        logical = (physical + self.batches_done) % self.streams
        done = self.batches_done // self.streams + (1 if logical < self.batches_done % self.streams else 0)
        st = self.states[logical]
        reader = SlotReader(self.settings, self.rank * self.streams + logical, self.epoch,
                            SlotState.from_dict(st) if st is not None else None)
        for b in range(done, self.batches_per_stream):
            samples = [reader.next_sample() for _ in range(self.batch_size)]
            yield logical, b, reader.state.to_dict(), self.collate(samples)


class ResumableLoader:
    """Iterable over one rank's batches, epoch by epoch; see the module docstring."""

    def __init__(self, cfg: DataConfig, settings: ReaderSettings, budget: EpochBudget, rank: int,
                 world_size: int, collate: Callable[[list], Any], state: Optional[dict] = None,
                 pin_memory: bool = False):
        self.cfg, self.settings, self.budget = cfg, settings, budget
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.collate = rank, world_size, collate
        self.streams = max(1, cfg.num_workers)
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch handed to the trainer
        self._workers: list[Optional[dict]] = [None] * self.streams
        self._skipped_before: dict[str, int] = {}  # counts of finished epochs
        self._filtered_before: dict[str, int] = {}
        if state is not None:
            self.load_state_dict(state)

    @property
    def batches_per_epoch(self) -> int:
        return self.budget.batches_per_rank

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _counts(self, before: dict[str, int], key: str) -> dict[str, int]:
        """Finished epochs' counts plus each stream's of the current epoch."""
        total = dict(before)
        for w in self._workers:
            if w is not None:
                total = _add(total, w[key])
        return total

    @property
    def skipped(self) -> dict[str, int]:
        return self._counts(self._skipped_before, "skipped")

    @property
    def filtered(self) -> dict[str, int]:
        return self._counts(self._filtered_before, "filtered")

    def info(self) -> dict:
        return {
            "stage": self.settings.stage,
            "batches_per_epoch": self.batches_per_epoch,
            "samples_per_stream": self.budget.samples_per_slot,
            "streams_per_rank": self.streams,
            "dropped_per_epoch": self.budget.dropped_per_epoch,
            "datasets": {ix.name: ix.total for ix in self.settings.indexes},
        }

    def _roll_epoch(self) -> None:
        if self.batches_done >= self.batches_per_epoch:
            self._skipped_before, self._filtered_before = self.skipped, self.filtered
            self._workers = [None] * self.streams
            self.epoch += 1
            self.batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        self._roll_epoch()
        ds = _EpochDataset(self.settings, self.rank, self.streams, self.epoch, list(self._workers),
                           self.batches_done, self.cfg.micro_batch_size,
                           self.budget.batches_per_stream, self.collate)
        if self.cfg.num_workers == 0:
            it: Any = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                 prefetch_factor=self.cfg.prefetch_factor, collate_fn=_identity,
                                 multiprocessing_context=self.cfg.mp_context, pin_memory=self.pin_memory))
        for logical, _, wstate, batch in it:
            if logical != self.batches_done % self.streams:
                raise RuntimeError(f"rank {self.rank}: batch {self.batches_done} of epoch "
                                   f"{self.epoch} came from stream {logical}, expected "
                                   f"{self.batches_done % self.streams}: worker order broke")
            self._workers[logical] = wstate
            self.batches_done += 1
            yield batch
        if self.batches_done != self.batches_per_epoch:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after "
                               f"{self.batches_done} batches, planned {self.batches_per_epoch}")
        self._roll_epoch()

    def state_dict(self) -> dict:
        self._roll_epoch()
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "batches_per_epoch": self.batches_per_epoch,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams_per_rank": self.streams,
            "stage": self.settings.stage,
            "datasets": [ix.name for ix in self.settings.indexes],
            "workers": [None if w is None else dict(w) for w in self._workers],
            "skipped_before": dict(self._skipped_before),
            "filtered_before": dict(self._filtered_before),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        # continuing exactly needs the same split of the data: refuse anything else loudly
        expect = {"seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                  "streams_per_rank": self.streams, "stage": self.settings.stage,
                  "datasets": [ix.name for ix in self.settings.indexes],
                  "batches_per_epoch": self.batches_per_epoch}
        for key, want in expect.items():
            if state.get(key) != want:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{want!r}: resume with the same data config, world size and "
                                 f"num_workers (or start the data stream afresh)")
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._workers = [None if w is None else dict(w) for w in state["workers"]]
        self._skipped_before = dict(state.get("skipped_before", {}))
        self._filtered_before = dict(state.get("filtered_before", {}))
        self._roll_epoch()


def build_loader(cfg: Any, rank: int, world_size: int,
                 transform: Optional[Callable[[dict], Any]] = None,
                 collate: Optional[Callable[[list], Any]] = None, stage: str = "stage2",
                 state: Optional[dict] = None,
                 too_long_exceptions: Optional[tuple[type[BaseException], ...]] = None,
                 pin_memory: bool = False) -> ResumableLoader:
    """Read the manifests and build this rank's loader (see the module docstring).

    ``pin_memory``: batches arrive in page-locked memory (GPU workers: the copy to the device is
    then asynchronous).

    ``cfg`` may also be the Hydra/OmegaConf ``data`` node (or a plain dict) of that schema.
    """
    if not isinstance(cfg, DataConfig):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    cfg.validate()
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    open_url = _Opener(cfg.s3_endpoint_url)
    indexes = [load_manifest(d.manifest, d.name, open_url) for d in cfg.datasets]
    streams = max(1, cfg.num_workers)
    num_slots = world_size * streams
    budget = epoch_budget(indexes, num_slots, streams, cfg.micro_batch_size, stage,
                          cfg.samples_per_epoch)
    settings = ReaderSettings(
        indexes=indexes, weights=[d.weight for d in cfg.datasets], seed=cfg.seed,
        num_slots=num_slots, shuffle_buffer=cfg.shuffle_buffer, stage=stage,
        on_error=cfg.on_error, min_image_side=cfg.min_image_side, open_url=open_url,
        transform=transform,
        too_long=processor_too_long_exceptions() if too_long_exceptions is None
        else tuple(too_long_exceptions))
    return ResumableLoader(cfg, settings, budget, rank, world_size, collate or list_collate, state,
                           pin_memory=pin_memory)


class _Opener:
    """Picklable ``open_url`` bound to an endpoint (DataLoader workers may be spawned)."""

    def __init__(self, endpoint: Optional[str]):
        self.endpoint = endpoint

    def __call__(self, url: str):
        return storage.open_url(url, "rb", self.endpoint)
