"""Start reading a shard tar at its n-th sample without reading the samples before it.

A block (plan.py) usually starts inside a shard. Read as a stream, the tar would be read from its
first byte; on a file that can seek, tarfile's random-access mode walks the member headers instead
and jumps over the member data (one 512-byte read per member). The caller then reads the samples
from that offset as a stream (``decode.iter_tar_samples``), exactly as from the start.

Over S3 a seek is cheap but the file object reads ahead (s3fs fetches large ranges), so the walk
saves little there beyond the decode of the skipped members; locally it saves the whole prefix.
"""
from __future__ import annotations

import tarfile
from typing import IO, Optional


def _sample_key(info: tarfile.TarInfo) -> Optional[str]:
    """The sample key of a member (the part of its name before the first dot), None for members
    that belong to no sample (the same grouping as decode.iter_tar_samples)."""
    if not info.isfile():
        return None
    key, dot, _ = info.name.rsplit("/", 1)[-1].partition(".")
    return key if dot else None


def seek_to_sample(f: IO[bytes], ordinal: int) -> int:
    """Put ``f`` at the first header of sample ``ordinal``; returns ``ordinal``, or 0 with ``f`` back
    at the start when it cannot seek or the walk does not get there (a damaged header, a short
    tar: reading from the start then meets and reports the damage as it always does). Storage
    errors propagate (the caller retries)."""
    seekable = getattr(f, "seekable", None)
    if ordinal <= 0 or seekable is None or not seekable():
        return 0
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
        key, count = None, -1
        while (info := tf.next()) is not None:
            k = _sample_key(info)
            if k is None or k == key:
                continue
            key, count = k, count + 1
            if count == ordinal:
                f.seek(info.offset)
                return ordinal
    except (tarfile.TarError, EOFError, ValueError):
        pass
    f.seek(0)
    return 0
