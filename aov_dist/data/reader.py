"""One worker stream: reads its planned samples, mixes datasets, skips bad samples, refills.

``SlotReader`` is what a DataLoader worker (or the training process with num_workers=0) runs for
one epoch. Its whole progress is ``SlotReader.state()``: the number of mixture draws made and, per
dataset, (repeat, offset) = which pass and how many of that pass's planned samples were taken.
Re-creating a reader from that state continues with exactly the next sample.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, IO, Iterator, Optional, Union

import numpy as np

from aov_dist.data.decode import FILTER_REASONS, Members, SampleError, decode_sample, iter_tar_samples
from aov_dist.data.plan import DRAW_CHUNK, DatasetIndex, PassPlan, mixture_draws, plan_pass

log = logging.getLogger(__name__)
# A storage outage (S3 endpoint down, connection reset) is retried shard by shard: attempts in
# all, sleeping READ_BACKOFF_S * 2**attempt between them (1+2+4+8 s, on top of botocore's own
# retries); then the read fails with an OSError naming the shard, never a silent skip.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 1.0


class _IOGuard:
    """File wrapper that remembers an exception raised by the storage itself (as opposed to bad
    tar content), so the reader can tell an outage from a corrupt shard."""

    def __init__(self, raw: Optional[IO[bytes]], io_error: Optional[BaseException] = None):
        self.raw, self.io_error = raw, io_error

    def read(self, n: int = -1) -> bytes:
        try:
            return self.raw.read(n)
        except Exception as e:
            self.io_error = e
            raise


@dataclass
class ReaderSettings:
    """Everything a worker needs besides its slot and state (shared by all workers of a rank)."""

    indexes: list[DatasetIndex]
    weights: list[float]
    seed: int
    num_slots: int
    shuffle_buffer: int
    stage: str
    on_error: str
    min_image_side: int
    open_url: Callable[[str], IO[bytes]]
    transform: Optional[Callable[[dict], Any]] = None
    too_long: tuple[type[BaseException], ...] = ()


@dataclass
class StreamPos:
    repeat: int = 0  # 0 = the epoch's pass; >0 = refill passes
    offset: int = 0  # planned samples of that pass already taken
    good: int = 0  # samples of that pass that were usable (guards against an endless refill)

    def to_dict(self) -> dict:
        return {"repeat": self.repeat, "offset": self.offset, "good": self.good}


class DatasetStream:
    """Planned samples of one dataset for one slot and epoch; rolls over into refill passes."""

    def __init__(self, cfg: ReaderSettings, ds_idx: int, slot: int, epoch: int, pos: StreamPos):
        self.cfg, self.ds_idx, self.slot, self.epoch = cfg, ds_idx, slot, epoch
        self.index = cfg.indexes[ds_idx]
        self.pos = pos
        self._open_pass()

    def _open_pass(self) -> None:
        c = self.cfg
        self.plan: PassPlan = plan_pass(self.index, self.ds_idx, c.seed, self.epoch, self.pos.repeat,
                                        self.slot, c.num_slots, c.shuffle_buffer)
        # read positions already handed out (on resume): read past them without keeping them
        self._taken = np.zeros(self.plan.length, dtype=bool)
        self._taken[self.plan.order[:self.pos.offset]] = True
        self._pending: dict[int, tuple[str, str, Union[Members, SampleError]]] = {}
        start = int(self.plan.order[self.pos.offset:].min()) if self.pos.offset < self.plan.length else 0
        self._reads = self._read_from(start)

    def _read_from(self, start: int) -> Iterator[tuple[int, str, str, Union[Members, SampleError]]]:
        """(read position, url, key, members or error) for positions >= the segment holding start."""
        p = self.plan
        first = max(i for i, s in enumerate(p.seg_start) if s <= start)
        for seg in range(first, len(p.segments)):
            shard_idx, lo, hi = p.segments[seg]
            shard = self.index.shards[shard_idx]
            base = p.seg_start[seg]
            got = 0
            err: Optional[SampleError] = None
            for attempt in range(READ_ATTEMPTS):
                guard: Optional[_IOGuard] = None
                try:
                    f = self.cfg.open_url(shard.url)
                except (FileNotFoundError, PermissionError) as e:  # lasting: the shard is not there
                    err = SampleError("corrupt_tar", shard.url, "<shard>", f"cannot open: {e}")
                    break
                except Exception as e:
                    guard = _IOGuard(None, e)
                else:
                    guard = _IOGuard(f)
                    try:
                        with f:
                            for ordinal, item in enumerate(iter_tar_samples(guard, shard.url, stop=hi,
                                                                            expected=shard.samples)):
                                if isinstance(item, SampleError):
                                    err = item
                                    break
                                if ordinal < got:
                                    continue  # handed out before a retry
                                got = ordinal + 1
                                if ordinal < lo:
                                    continue
                                yield base + ordinal - lo, shard.url, item[0], item[1]
                    except Exception as e:  # storage errors tarfile does not catch (botocore's)
                        if guard.io_error is None:
                            raise
                if guard.io_error is None:
                    break
                # the storage failed, not the data: read the shard again after a pause (samples
                # already handed out are skipped), bounded so a lasting outage fails loudly
                if attempt == READ_ATTEMPTS - 1:
                    raise OSError(f"shard {shard.url}: storage unreachable after {READ_ATTEMPTS} "
                                  f"attempts (last: {type(guard.io_error).__name__}: "
                                  f"{guard.io_error})") from guard.io_error
                log.warning("shard %s: read failed after %d samples (%s: %s); retrying in %.1f s",
                            shard.url, got, type(guard.io_error).__name__, guard.io_error,
                            READ_BACKOFF_S * 2 ** attempt)
                time.sleep(READ_BACKOFF_S * 2 ** attempt)
                err = None
            if got < hi and err is None:
                err = SampleError("corrupt_tar", shard.url, "<end of shard>",
                                  f"shard ended after {got} samples, manifest says "
                                  f"{shard.samples}")
            # every planned position must come out exactly once, or emission would stall
            for ordinal in range(max(got, lo), hi):
                # the keys of lost samples are unknown: name them by their place in the shard
                key = f"#{ordinal}"
                yield base + ordinal - lo, shard.url, key, SampleError(
                    "corrupt_tar", shard.url, key, f"sample lost, reading stopped at key "
                    f"{err.key!r}: {err.detail}")

    def next_raw(self) -> tuple[str, str, Union[Members, SampleError]]:
        """The next planned sample's (url, key, members or error); advances the position."""
        if self.pos.offset >= self.plan.length:
            if self.pos.good == 0:
                raise RuntimeError(f"dataset {self.index.name!r} ({self.index.manifest_url}): a whole "
                                   f"pass of stream {self.slot} (epoch {self.epoch}, repeat "
                                   f"{self.pos.repeat}) had no usable sample; cannot refill")
            self.pos = StreamPos(self.pos.repeat + 1, 0, 0)
            self._open_pass()
        target = int(self.plan.order[self.pos.offset])
        while target not in self._pending:
            rpos, url, key, payload = next(self._reads)
            if not self._taken[rpos]:
                self._pending[rpos] = (url, key, payload)
        self.pos.offset += 1
        self._taken[target] = True
        return self._pending.pop(target)


@dataclass
class SlotState:
    draws: int = 0
    streams: list[StreamPos] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples by reason (this epoch)
    filtered: dict[str, int] = field(default_factory=dict)  # stage-1 filters by reason (this epoch)

    def to_dict(self) -> dict:
        return {"draws": self.draws, "streams": [s.to_dict() for s in self.streams],
                "skipped": dict(self.skipped), "filtered": dict(self.filtered)}

    @classmethod
    def from_dict(cls, d: dict) -> "SlotState":
        return cls(int(d["draws"]), [StreamPos(**s) for s in d["streams"]],
                   dict(d.get("skipped", {})), dict(d.get("filtered", {})))


class SlotReader:
    """Good, transformed samples of one slot in one epoch, in deterministic order."""

    def __init__(self, cfg: ReaderSettings, slot: int, epoch: int, state: Optional[SlotState] = None):
        self.cfg, self.slot, self.epoch = cfg, slot, epoch
        self.state = state or SlotState(streams=[StreamPos() for _ in cfg.indexes])
        if len(self.state.streams) != len(cfg.indexes):
            raise ValueError(f"loader state has {len(self.state.streams)} dataset streams, config "
                             f"has {len(cfg.indexes)} datasets")
        self.streams = [DatasetStream(cfg, d, slot, epoch, pos)
                        for d, pos in enumerate(self.state.streams)]
        self._draw_buf = np.empty(0, dtype=np.int64)
        self._draw_buf_start = 0

    def _choose(self) -> int:
        if len(self.streams) == 1:
            return 0
        j = self.state.draws - self._draw_buf_start
        if not 0 <= j < len(self._draw_buf):
            self._draw_buf_start = self.state.draws
            self._draw_buf = mixture_draws(self.cfg.weights, self.cfg.seed, self.epoch, self.slot,
                                           self.state.draws, DRAW_CHUNK)
            j = 0
        return int(self._draw_buf[j])

    def _count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def next_sample(self) -> Any:
        c = self.cfg
        while True:
            d = self._choose()
            self.state.draws += 1
            stream = self.streams[d]
            url, key, payload = stream.next_raw()
            # keep the state object's stream list pointing at the live positions
            self.state.streams[d] = stream.pos
            try:
                if isinstance(payload, SampleError):
                    raise payload
                raw = decode_sample(payload, key, url, stream.index.name, stage=c.stage,
                                    min_image_side=c.min_image_side)
                if c.transform is None:
                    out = raw
                else:
                    try:
                        out = c.transform(raw)
                    except c.too_long as e:
                        raise SampleError("too_long", url, key, f"id {raw['id']!r}: {e}") from None
                    except Exception as e:
                        # a failing transform is a bug, not bad data: never skip it silently
                        raise RuntimeError(f"transform failed on shard {url} sample {key!r} "
                                           f"(id {raw['id']!r}): {type(e).__name__}: {e}") from e
            except SampleError as e:
                if e.reason in FILTER_REASONS:
                    self._count(self.state.filtered, e.reason)
                    continue
                if c.on_error == "fail":
                    raise
                self._count(self.state.skipped, e.reason)
                continue
            stream.pos.good += 1
            return out
