"""Reading the planned samples (plan.py): shards with retries, lanes, micro-batches with replacements.

``EpochReader.micro_batch(g, u)`` is what a DataLoader worker (or the training process with
num_workers=0) runs for each micro-batch it owns: place u of global batch g of one epoch. Its
result depends on (manifests, seed, epoch, g, u) and the data only, never on which rank or worker
reads it; that is what makes every layout see the same micro-batches.

A micro-batch reads its span of lane u (plan.EpochPlan.span) in order: every sample there is
decoded (bad ones are counted in ``skipped``, stage-1 filtered ones in ``filtered``) and the first
``micro_batch_size`` usable ones are kept (a few more usable ones in a long stage-1 span are left
unused). When the span has fewer, the micro-batch takes the next usable samples of the refill
sequence's lane u from position ``2 * lo`` on (``lo`` = its span's start: twice its span is its
own before it reaches the next micro-batch's refills): the replacement depends on (seed, epoch, g,
u) and the data only. Reads stay shard-local: a lane walks its blocks in order, each block one run of
one tar (read from its first needed member, its members kept until their turn comes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, IO, Iterator, Optional, Union

import numpy as np

from aov_dist.data.decode import FILTER_REASONS, Members, SampleError, decode_sample, iter_tar_samples
from aov_dist.data.plan import (MAIN, REFILL, DatasetIndex, DatasetLanePlan, EpochPlan, LaneDraws,
                                ShardInfo)
from aov_dist.data.tar_seek import seek_to_sample

log = logging.getLogger(__name__)
# A storage outage (S3 endpoint down, connection reset) is retried shard by shard: attempts in
# all, sleeping READ_BACKOFF_S * 2**attempt between them (1+2+4+8 s, on top of botocore's own
# retries); then the read fails with an OSError naming the shard, never a silent skip.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 1.0

Raw = tuple[str, str, Union[Members, SampleError]]  # shard url, sample key, members or the error


class _IOGuard:
    """File wrapper that remembers an exception raised by the storage itself (as opposed to bad
    tar content), so the reader can tell an outage from a corrupt shard."""

    def __init__(self, raw: Optional[IO[bytes]], io_error: Optional[BaseException] = None):
        self.raw, self.io_error = raw, io_error

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.raw, name)(*args)
        except Exception as e:
            self.io_error = e
            raise

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call("seek", offset, whence)

    def tell(self) -> int:
        return self._call("tell")

    def seekable(self) -> bool:
        return bool(getattr(self.raw, "seekable", lambda: False)())


@dataclass
class ReaderSettings:
    """Everything a worker needs to read its micro-batches (shared by all workers of a rank)."""

    indexes: list[DatasetIndex]
    blocks: list[np.ndarray]  # plan.dataset_blocks of each dataset
    weights: list[float]
    seed: int
    plan: EpochPlan
    stage: str
    on_error: str
    min_image_side: int
    open_url: Callable[[str], IO[bytes]]
    transform: Optional[Callable[[dict], Any]] = None
    too_long: tuple[type[BaseException], ...] = ()


def read_shard(open_url: Callable[[str], IO[bytes]], shard: ShardInfo, start: int
               ) -> Iterator[tuple[int, Raw]]:
    """(ordinal, raw sample) of every sample ``start``.. of a shard in file order, each exactly once:
    samples a damaged or short tar loses come out as ``corrupt_tar`` errors, storage errors are
    retried (the samples already handed out are not repeated)."""
    got = start  # ordinals below this are handed out (or not wanted)
    err: Optional[SampleError] = None
    for attempt in range(READ_ATTEMPTS):
        try:
            f = open_url(shard.url)
        except (FileNotFoundError, PermissionError) as e:  # lasting: the shard is not there
            err = SampleError("corrupt_tar", shard.url, "<shard>", f"cannot open: {e}")
            break
        except Exception as e:
            guard = _IOGuard(None, e)
        else:
            guard = _IOGuard(f)
            try:
                with f:
                    base = seek_to_sample(guard, got)
                    items = iter_tar_samples(guard, shard.url, expected=shard.samples - base)
                    for ordinal, item in enumerate(items, base):
                        if isinstance(item, SampleError):
                            err = item if base == 0 else SampleError(
                                item.reason, item.url, item.key, f"{item.detail} (counted from sample "
                                f"{base}, where this read started)")
                            break
                        if ordinal >= got:
                            got = ordinal + 1
                            yield ordinal, (shard.url, item[0], item[1])
            except Exception:  # storage errors tarfile does not catch (botocore's)
                if guard.io_error is None:
                    raise
        if guard.io_error is None:
            break
        # the storage failed, not the data: read the shard again after a pause (samples already
        # handed out are skipped), bounded so a lasting outage fails loudly
        if attempt == READ_ATTEMPTS - 1:
            raise OSError(f"shard {shard.url}: storage unreachable after {READ_ATTEMPTS} attempts "
                          f"(last: {type(guard.io_error).__name__}: {guard.io_error})") from guard.io_error
        log.warning("shard %s: read failed after %d samples (%s: %s); retrying in %.1f s", shard.url,
                    got, type(guard.io_error).__name__, guard.io_error, READ_BACKOFF_S * 2 ** attempt)
        time.sleep(READ_BACKOFF_S * 2 ** attempt)
        err = None
    if got < shard.samples and err is None:
        err = SampleError("corrupt_tar", shard.url, "<end of shard>",
                          f"shard ended after {got} samples, manifest says {shard.samples}")
    for ordinal in range(got, shard.samples):
        # the keys of lost samples are unknown: name them by their place in the shard
        key = f"#{ordinal}"
        yield ordinal, (shard.url, key, SampleError("corrupt_tar", shard.url, key, f"sample lost, reading "
                                                    f"stopped at key {err.key!r}: {err.detail}"))


class DatasetLane:
    """Raw samples of one dataset in one lane, by the dataset's position in the lane.

    One open shard at a time: a block is read from its first member this lane still needs, and
    members read before their turn wait in ``_stash`` (at most one block). A later block of the
    same shard continues the open read when it starts further on."""

    def __init__(self, settings: ReaderSettings, plan: DatasetLanePlan, index: DatasetIndex):
        self.settings, self.plan, self.index = settings, plan, index
        self._shard = -1
        self._next = 0  # ordinal the open read hands out next
        self._reads: Optional[Iterator[tuple[int, Raw]]] = None
        self._block: Optional[tuple[int, int]] = None
        self._last = -1
        self._stash: dict[int, Raw] = {}
        self.opens = 0

    def raw(self, q: int) -> Raw:
        place = self.plan.place(q)
        target = place.member
        same = place.block == self._block and q > self._last
        self._block, self._last = place.block, q
        if same and target in self._stash:
            return self._stash.pop(target)
        if not same or target < self._next:  # a new block, a position met before, or a jump back
            self._stash = {}
            start = int(place.members[place.offset:].min())
            if self._shard != place.shard or self._next > start:
                self._open(place.shard, start)
        later = set(place.members[place.offset + 1:].tolist())
        while True:
            ordinal, raw = next(self._reads)
            self._next = ordinal + 1
            if ordinal == target:
                return raw
            if ordinal in later:
                self._stash[ordinal] = raw

    def _open(self, shard: int, start: int) -> None:
        self.close()
        self._shard, self._next, self.opens = shard, start, self.opens + 1
        self._reads = read_shard(self.settings.open_url, self.index.shards[shard], start)

    def close(self) -> None:
        if self._reads is not None:
            self._reads.close()
        self._reads, self._shard = None, -1


class LaneReader:
    """Raw samples of one lane of one sequence (main or refill), by lane position."""

    def __init__(self, settings: ReaderSettings, kind: int, lane: int, epoch: int):
        s = settings
        self.datasets = [DatasetLane(s, DatasetLanePlan(s.blocks[d], ix.total, s.seed, kind, d, epoch, lane,
                                                        s.plan.lanes), ix) for d, ix in enumerate(s.indexes)]
        self.draws = LaneDraws(s.weights, s.seed, kind, epoch, lane) if len(s.indexes) > 1 else None

    def raw(self, i: int) -> tuple[DatasetIndex, Raw]:
        d, q = self.draws.at(i) if self.draws is not None else (0, i)
        return self.datasets[d].index, self.datasets[d].raw(q)


def _count(table: dict[str, int], reason: str) -> None:
    table[reason] = table.get(reason, 0) + 1


class EpochReader:
    """The micro-batches of one epoch that one worker owns (see the module docstring)."""

    def __init__(self, settings: ReaderSettings, epoch: int):
        self.settings, self.epoch = settings, epoch
        self._lanes: dict[tuple[int, int], LaneReader] = {}
        self.skipped: dict[str, int] = {}  # bad samples by reason, since the last take_counts()
        self.filtered: dict[str, int] = {}  # stage-1 filters by reason, since the last take_counts()

    def lane(self, kind: int, u: int) -> LaneReader:
        if (kind, u) not in self._lanes:
            self._lanes[(kind, u)] = LaneReader(self.settings, kind, u, self.epoch)
        return self._lanes[(kind, u)]

    def micro_batch(self, g: int, u: int) -> list:
        """The usable (transformed) samples of place u of global batch g, in order."""
        c = self.settings
        size = c.plan.micro_batch_size
        lo, hi = c.plan.span(g)
        out: list = []
        main = self.lane(MAIN, u)
        for i in range(lo, hi):
            self._use(*main.raw(i), out, keep=len(out) < size)
        # each micro-batch has twice its span of the refill lane to itself before it meets the next one's
        refill, i = self.lane(REFILL, u), 2 * lo
        while len(out) < size:
            if i - 2 * lo >= c.plan.lane_positions + hi - lo:
                raise RuntimeError(f"epoch {self.epoch}, global batch {g}, micro-batch place {u}: a whole "
                                   f"lane of the refill sequence ({i - 2 * lo} samples of "
                                   f"{[ix.name for ix in c.indexes]}) had no usable sample")
            self._use(*refill.raw(i), out, keep=True)
            i += 1
        return out

    def take_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        counts, self.skipped, self.filtered = (self.skipped, self.filtered), {}, {}
        return counts

    def _use(self, index: DatasetIndex, raw: Raw, out: list, keep: bool) -> None:
        """Decode one sample (counting it when bad or filtered); append it to ``out`` transformed
        when it is usable and ``keep``."""
        c = self.settings
        url, key, payload = raw
        try:
            if isinstance(payload, SampleError):
                raise payload
            sample = decode_sample(payload, key, url, index.name, stage=c.stage, min_image_side=c.min_image_side)
            if not keep:
                return
            if c.transform is None:
                out.append(sample)
                return
            try:
                out.append(c.transform(sample))
            except c.too_long as e:
                raise SampleError("too_long", url, key, f"id {sample['id']!r}: {e}") from None
            except Exception as e:
                # a failing transform is a bug, not bad data: never skip it silently
                raise RuntimeError(f"transform failed on shard {url} sample {key!r} "
                                   f"(id {sample['id']!r}): {type(e).__name__}: {e}") from e
        except SampleError as e:
            if e.reason in FILTER_REASONS:
                _count(self.filtered, e.reason)
                return
            if c.on_error == "fail":
                raise
            _count(self.skipped, e.reason)

    def close(self) -> None:
        for lane in self._lanes.values():
            for ds in lane.datasets:
                ds.close()

    @property
    def opens(self) -> int:
        """Shard opens so far (retries after a storage error not counted)."""
        return sum(ds.opens for lane in self._lanes.values() for ds in lane.datasets)
