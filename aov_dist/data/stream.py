"""Resumable streaming loader over aov-shards (docs/architecture.md §1-§3) with one global order.

Public API::

    loader = build_loader(cfg: DataConfig, rank: int, world_size: int,
                          transform=None,     # raw sample dict -> encoded (processor.encode_conversation)
                          collate=None,       # list[encoded] -> batch (processor.collate); default: list
                          stage="stage2",     # "stage1": labelled single-image samples only
                          state=None,         # a loader.state_dict() of any rank of any layout
                          too_long_exceptions=None,  # default: processor.ImageTokensExceedMaxLength
                          global_batch_size=None)    # default: world_size x micro_batch_size
    for epoch in range(loader.epoch, num_epochs):
        for batch in loader:                  # yields exactly loader.batches_per_epoch micro-batches
            ...
            ckpt["data"] = loader.state_dict()   # small JSON-able dict, after an optimizer step
    loader.skipped    # {reason: count} of this rank's bad samples, cumulative (decode.SKIP_REASONS)
    loader.filtered   # {reason: count} of this rank's stage-1 filtered samples (decode.FILTER_REASONS)
    loader.info()     # sizes for logging: batches_per_epoch, global_batches_per_epoch, lanes, ...

With the model's processor use ``transforms.ConversationTransform(processor, max_length)`` (stage 2)
or ``transforms.ExpertTransform(processor)`` (stage 1) and ``collate=processor.collate``.

How order, balance and resume work (details in plan.py and reader.py):

* One order for every layout: the micro-batches of an epoch are a function of the manifests, the
  seed, the epoch, ``data.block_size`` and the (global, micro) batch sizes; never of the number of
  ranks or DataLoader workers. Each dataset's shards are cut into blocks of ``block_size``
  consecutive samples; per epoch the blocks are put in a seeded order and each block's samples
  too. A global batch has ``lanes = global_batch_size / micro_batch_size`` micro-batch places;
  place u of every global batch reads the next span of lane u, a contiguous range of the block
  order (plan.py), so a micro-batch reads one block (or two) of one shard.
* Global batches: the epoch's sequence is global batch after global batch, place after place, so
  micro-batch m of global batch g holds positions ``[m * micro, (m + 1) * micro)`` of it. With
  ``accum = global_batch_size / (world_size * micro_batch_size)``, rank r gets places
  ``[r * accum, (r + 1) * accum)`` of every global batch, in that order: a contiguous slice.
  An epoch has ``floor(usable samples / global_batch_size)`` global batches for every layout;
  ``batches_per_epoch`` = that x accum micro-batches per rank (equal on every rank: ZeRO-3 hangs
  otherwise).
* Bad and filtered samples: a micro-batch whose span has fewer usable samples than it needs takes
  the next usable ones of a refill sequence at its own place (reader.py): the rule depends on
  (seed, epoch, global batch, place) and the data only, so every layout replaces them alike.
  ``on_error: skip`` counts bad samples in ``loader.skipped``, ``fail`` raises
  ``decode.SampleError`` naming the shard URL and sample key; a tar that ends early or breaks is
  checked against the manifest's sample count, so lost samples are counted too.
* Stage 1 keeps labelled single-image samples (multi-view and unlabelled ones are filtered and
  counted). Its epoch holds the manifests' labelled samples and its spans are stretched by the
  labelled share (about ``micro_batch_size / share`` positions), so replacements stay the exception
  when the manifest is right. The cost grows as the share shrinks: every sample of a span is read
  and decoded (filters come before the image decode), so a share of 10 % reads ten samples per
  used one, and the usable ones of a span beyond ``micro_batch_size`` are left unused.
* Mixture: in every lane, each position draws a dataset by weight (seeded); each dataset keeps its
  own position and cycles through reshuffled passes when drawn more often than its size allows.
  ``data.samples_per_epoch`` sets the epoch's usable samples (default: the datasets' sizes).
* DataLoader workers (any ``num_workers``; 0 = in this process): worker ``w`` makes this rank's
  micro-batches ``t`` with ``t % workers == w``; the DataLoader hands them out round-robin, so
  they arrive in order, and the loader checks that. Prefetched batches are not counted as
  consumed. When ``num_workers`` divides ``accum`` every lane is read by one worker; otherwise
  workers share lanes and read (not decode) each other's samples too.
* State: ``state_dict()`` is (epoch, global batches done) plus the settings that fix the order and
  this rank's counts; any rank of any layout can load any rank's state and continues with exactly
  the next global batch's micro-batches of its own places. A state with another seed, datasets,
  stage, block size, samples per epoch, global or micro batch size is refused naming the key.
  Counts: a state of the same rank and world size restores that rank's counts; any other starts
  from zero (the loop hands rank 0 the job's totals with ``set_counts_before``).
* Epochs: ``iter(loader)`` yields the rest of the current epoch, then advances ``loader.epoch``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aov_dist import storage
from aov_dist.data.config import DataConfig
from aov_dist.data.loader_state import check_state, counts_from_state, state_of
from aov_dist.data.plan import dataset_blocks, load_manifest, plan_epoch
from aov_dist.data.reader import EpochReader, ReaderSettings

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
    """This rank's micro-batches ``start``.. of one epoch; DataLoader worker w makes every
    ``workers``-th one from ``start + w`` on."""

    def __init__(self, settings: ReaderSettings, rank: int, accum: int, epoch: int, start: int,
                 workers: int, collate: Callable[[list], Any]):
        super().__init__()
        self.settings, self.rank, self.accum, self.epoch = settings, rank, accum, epoch
        self.start, self.workers, self.collate = start, workers, collate

    def __iter__(self) -> Iterator[tuple[int, dict, dict, Any]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, the loader planned {self.workers}")
        reader = EpochReader(self.settings, self.epoch)
        try:
            for t in range(self.start + w, self.settings.plan.global_batches * self.accum, self.workers):
                g, a = divmod(t, self.accum)
                samples = reader.micro_batch(g, self.rank * self.accum + a)
                skipped, filtered = reader.take_counts()
                yield t, skipped, filtered, self.collate(samples)
        finally:
            reader.close()


class ResumableLoader:
    """Iterable over one rank's micro-batches, epoch by epoch; see the module docstring."""

    def __init__(self, cfg: DataConfig, settings: ReaderSettings, rank: int, world_size: int,
                 global_batch_size: int, collate: Callable[[list], Any], pin_memory: bool = False):
        self.cfg, self.settings, self.pin_memory = cfg, settings, pin_memory
        self.rank, self.world_size, self.collate = rank, world_size, collate
        self.global_batch_size = global_batch_size
        self.accum = global_batch_size // (world_size * cfg.micro_batch_size)
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch handed to the trainer
        self.skipped: dict[str, int] = {}  # this rank's counts of batches handed out
        self.filtered: dict[str, int] = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.settings.plan.global_batches * self.accum

    def __len__(self) -> int:
        return self.batches_per_epoch

    def info(self) -> dict:
        plan = self.settings.plan
        return {
            "stage": self.settings.stage,
            "batches_per_epoch": self.batches_per_epoch,
            "global_batches_per_epoch": plan.global_batches,
            "accumulation": self.accum,
            "lanes": plan.lanes,
            "lane_positions_per_epoch": plan.lane_positions,
            "usable_per_epoch": plan.usable,
            "dropped_per_epoch": plan.dropped,
            "datasets": {ix.name: ix.total for ix in self.settings.indexes},
        }

    def set_counts_before(self, skipped: dict, filtered: dict) -> None:
        """Make this rank's counts ``skipped`` / ``filtered`` (the job's totals at a resume on
        another world size, handed to rank 0); batches handed out from now on add to them."""
        self.skipped = {k: int(v) for k, v in skipped.items()}
        self.filtered = {k: int(v) for k, v in filtered.items()}

    def _roll_epoch(self) -> None:
        if self.batches_done >= self.batches_per_epoch:
            self.epoch += 1
            self.batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        self._roll_epoch()
        workers = max(1, self.cfg.num_workers)
        ds = _EpochDataset(self.settings, self.rank, self.accum, self.epoch, self.batches_done, workers,
                           self.collate)
        if self.cfg.num_workers == 0:
            it: Any = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                 prefetch_factor=self.cfg.prefetch_factor, collate_fn=_identity,
                                 multiprocessing_context=self.cfg.mp_context, pin_memory=self.pin_memory))
        for t, skipped, filtered, batch in it:
            if t != self.batches_done:
                raise RuntimeError(f"rank {self.rank}: micro-batch {self.batches_done} of epoch {self.epoch} "
                                   f"was due, a worker handed out {t}: worker order broke")
            self.skipped, self.filtered = _add(self.skipped, skipped), _add(self.filtered, filtered)
            self.batches_done += 1
            yield batch
        if self.batches_done != self.batches_per_epoch:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after "
                               f"{self.batches_done} micro-batches, planned {self.batches_per_epoch}")
        self._roll_epoch()

    def state_dict(self) -> dict:
        # Read-only: a checkpoint taken on an epoch's last step happens while ``__iter__`` of that
        # epoch is still open; rolling the epoch here would make it check the next one's count.
        epoch, done = self.epoch, self.batches_done
        if done >= self.batches_per_epoch:  # the epoch is over: the state is the next one's start
            epoch, done = epoch + 1, 0
        if done % self.accum:
            raise ValueError(f"rank {self.rank}: state_dict() after {done} micro-batches, "
                             f"inside a global batch of {self.accum}: take it after an optimizer step")
        return state_of(self, epoch, done // self.accum)

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state)
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["global_batches_done"]) * self.accum
        self.skipped, self.filtered = counts_from_state(self, state)
        self._roll_epoch()


def build_loader(cfg: Any, rank: int, world_size: int,
                 transform: Optional[Callable[[dict], Any]] = None,
                 collate: Optional[Callable[[list], Any]] = None, stage: str = "stage2",
                 state: Optional[dict] = None,
                 too_long_exceptions: Optional[tuple[type[BaseException], ...]] = None,
                 pin_memory: bool = False, global_batch_size: Optional[int] = None) -> ResumableLoader:
    """Read the manifests and build this rank's loader (see the module docstring).

    ``pin_memory``: batches arrive in page-locked memory (GPU workers: the copy to the device is
    then asynchronous). ``global_batch_size``: samples per optimizer step on all ranks together
    (the job's ``stage.global_batch_size``); a multiple of ``world_size x micro_batch_size``.

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
    per_step = world_size * cfg.micro_batch_size
    global_batch_size = per_step if global_batch_size is None else global_batch_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(f"stage.global_batch_size: {global_batch_size} is not a positive multiple of "
                         f"world_size x data.micro_batch_size = {per_step}")
    open_url = _Opener(cfg.s3_endpoint_url)
    indexes = [load_manifest(d.manifest, d.name, open_url) for d in cfg.datasets]
    weights = [d.weight for d in cfg.datasets]
    plan = plan_epoch(indexes, weights, stage, global_batch_size, cfg.micro_batch_size, cfg.samples_per_epoch)
    settings = ReaderSettings(
        indexes=indexes, blocks=[dataset_blocks(ix, cfg.block_size) for ix in indexes], weights=weights,
        seed=cfg.seed, plan=plan, stage=stage, on_error=cfg.on_error, min_image_side=cfg.min_image_side,
        open_url=open_url, transform=transform,
        too_long=processor_too_long_exceptions() if too_long_exceptions is None
        else tuple(too_long_exceptions))
    loader = ResumableLoader(cfg, settings, rank, world_size, global_batch_size, collate or list_collate,
                             pin_memory=pin_memory)
    if state is not None:
        loader.load_state_dict(state)
    return loader


class _Opener:
    """Picklable ``open_url`` bound to an endpoint (DataLoader workers may be spawned)."""

    def __init__(self, endpoint: Optional[str]):
        self.endpoint = endpoint

    def __call__(self, url: str):
        return storage.open_url(url, "rb", self.endpoint)
