"""WebDataset shard writer and its manifest (docs/architecture.md §2 is the contract).

``write_shards`` validates EVERY record of every input first (``records.check_file``), then:

* ``on_error="fail"``: any invalid record raises ShardError listing them; nothing is written;
* ``on_error="skip"``: invalid records are left out and listed in ``manifest["skipped"]``.

A file-level problem (unreadable file, malformed JSON) is fatal in both modes: silently dropping a
whole input the user named would be worse than stopping.

Shards are ``<prefix>-000000.tar`` ... in ``out`` (a local folder or ``s3://bucket/prefix``); per
sample ``<key>.json`` then ``<key>.img<i>.<ext>`` with the original image bytes, key = zero-padded
global index. Tar headers are fixed (USTAR, mtime, uid/gid, mode) so the same inputs give
byte-identical shards. ``manifest.json`` is written last: a folder without one is incomplete.
Set ``SOURCE_DATE_EPOCH`` to also make the manifest's ``created`` field reproducible.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from typing import Callable, Optional, Sequence

from aov_dist import __version__
from aov_dist import storage
from aov_dist.data.records import CheckedRecord, RecordError, RecordFileError, check_file

FORMAT, VERSION = "aov-shards", 1
MANIFEST = "manifest.json"
KEY_DIGITS = 9
FIXED_MTIME = 946684800  # 2000-01-01: a constant so archives are reproducible
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MEMBER_RE = re.compile(r"^(?P<key>[0-9]{%d})\.(?:json|img(?P<i>[0-9]{1,3})\.(?P<ext>[a-z0-9]{1,8}))$" % KEY_DIGITS)
_TAR_BLOCK = 512


class ShardError(RuntimeError):
    """The shard set cannot be written (invalid records with on_error=fail, bad arguments, ...)."""


class HashingWriter:
    """File-like wrapper: counts and hashes the bytes written through it."""

    def __init__(self, raw):
        self.raw, self.count, self.sha = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        pass


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def image_ext(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()


def source_name(url: str) -> str:
    """Dataset name of an input file: its file name without ``.json``."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[:-5] if name.lower().endswith(".json") else name


def sample_json(rec: CheckedRecord, source: str) -> bytes:
    meta = {"id": rec.id, "conversations": rec.record["conversations"], "label": rec.label,
            "label_source": rec.label_source, "images": rec.images, "source": source}
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _padded(n: int) -> int:
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Writes consecutive shards, rolling over at the size target."""

    def __init__(self, out: str, prefix: str, limit: int, endpoint_url: Optional[str]):
        self.out, self.prefix, self.limit, self.endpoint = out, prefix, limit, endpoint_url
        self.entries: list[dict] = []
        self._file = self._hw = self._tar = None
        self._samples = self._estimate = 0

    def _open(self) -> None:
        url = storage.join_url(self.out, shard_name(self.prefix, len(self.entries)))
        self._file = storage.open_url(url, "wb", self.endpoint)
        self._hw = HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.USTAR_FORMAT)
        self._samples, self._estimate = 0, 0

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks; leaves our file object open
        self._file.close()
        self.entries.append({"url": shard_name(self.prefix, len(self.entries)), "samples": self._samples,
                             "bytes": self._hw.count, "sha256": self._hw.sha.hexdigest()})
        self._tar = None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(_padded(len(d)) for _, d in members)
        if self._tar is not None and self._samples and self._estimate + size > self.limit:
            self.close_shard()
        if self._tar is None:
            self._open()
        for name, data in members:
            _add(self._tar, name, data)
        self._samples += 1
        self._estimate += size


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _skipped(errors: list[RecordError]) -> list[dict]:
    """One entry per skipped record, all of its problems joined."""
    grouped: dict[tuple[str, int], dict] = {}
    for e in errors:
        entry = grouped.setdefault((e.file, e.index), {"file": e.file, "index": e.index, "id": e.id, "reason": []})
        entry["reason"].append(e.reason)
    return [{**v, "reason": "; ".join(v["reason"])} for v in grouped.values()]


def format_errors(errors: Sequence[RecordError], limit: int = 50) -> str:
    lines = [str(e) for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return "\n".join(lines)


def _prepare_out(out: str, prefix: str, overwrite: bool, endpoint_url: Optional[str]) -> None:
    """Refuse to mix with an existing shard set unless asked; then clear OUR old files only."""
    names = storage.list_names(out, endpoint_url)
    ours = [n for n in names if n == MANIFEST or re.fullmatch(re.escape(prefix) + r"-[0-9]{6}\.tar", n)]
    if ours and not overwrite:
        raise ShardError(f"{out} already holds a shard set ({len(ours)} files such as {ours[0]}); "
                         "pass --overwrite to replace it")
    # Manifest first: if we die half-way, the folder reads as incomplete rather than as the old set.
    for name in sorted(ours, key=lambda n: n != MANIFEST):
        storage.remove(storage.join_url(out, name), endpoint_url)
    storage.makedirs(out, endpoint_url)


def write_shards(inputs: Sequence[str], out: str, image_root: Optional[str] = None,
                 shard_size_mb: float = 256.0, on_error: str = "skip", prefix: str = "shard",
                 overwrite: bool = False, endpoint_url: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Validate ``inputs``, write shards and ``manifest.json`` to ``out``; return the manifest.

    ``image_root`` is the folder image paths are relative to (default: each input file's folder).
    """
    log = log or (lambda msg: None)
    if on_error not in ("skip", "fail"):
        raise ShardError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
    if not PREFIX_RE.match(prefix):
        raise ShardError(f"shard prefix {prefix!r} must match {PREFIX_RE.pattern}")
    if not shard_size_mb > 0:
        raise ShardError(f"shard_size_mb={shard_size_mb} must be > 0")
    if not inputs:
        raise ShardError("no input record files given")

    sources, valid, errors = [], [], []
    for url in inputs:
        try:
            checked = check_file(url, image_root, endpoint_url=endpoint_url)
        except RecordFileError as e:
            raise ShardError(str(e)) from e
        sources.append({"path": url, "sha256": checked.sha256, "records": checked.n_records})
        valid += [(g, source_name(url)) for g in checked.valid]
        errors += checked.errors
        log(f"{url}: {len(checked.valid)} valid, {len(checked.invalid_indices)} invalid records")
    if errors and on_error == "fail":
        raise ShardError(f"{len(errors)} problem(s) in the input records; nothing was written:\n"
                         + format_errors(errors))
    if not valid:
        raise ShardError("no valid records to write:\n" + format_errors(errors))

    _prepare_out(out, prefix, overwrite, endpoint_url)
    sink = _ShardSink(out, prefix, int(shard_size_mb * 2 ** 20), endpoint_url)
    labels, derived = Counter(), Counter()
    for n, (rec, source) in enumerate(valid):
        key = sample_key(n)
        members = [(f"{key}.json", sample_json(rec, source))]
        root = image_root if image_root is not None else storage.dirname_url(rec.file)
        for i, path in enumerate(rec.images):
            try:
                data = storage.read_bytes(storage.join_url(root, path), endpoint_url)
            except OSError as e:  # it was readable during validation: the input changed under us
                raise ShardError(f"{rec.file}: record {rec.index} (id={rec.id!r}): image {path!r} "
                                 f"vanished while writing: {e}") from e
            members.append((f"{key}.img{i}.{image_ext(path)}", data))
        sink.add(members)
        labels[{0: "normal", 1: "anomalous", None: "unknown"}[rec.label]] += 1
        if rec.label_source:
            derived[rec.label_source] += 1
    sink.close_shard()

    manifest = {
        "format": FORMAT, "version": VERSION, "writer": f"aov-dist {__version__}", "created": _created(),
        "sources": sources, "shards": sink.entries,
        "totals": {"shards": len(sink.entries), "samples": len(valid),
                   "bytes": sum(s["bytes"] for s in sink.entries),
                   "labels": {k: labels[k] for k in ("normal", "anomalous", "unknown")},
                   "derived_labels": {k: derived[k] for k in ("explicit", "folder", "qa")}},
        "skipped": _skipped(errors),
    }
    storage.write_bytes(storage.join_url(out, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode(), endpoint_url)
    log(f"wrote {len(valid)} samples in {len(sink.entries)} shard(s) to {out}; skipped {len(manifest['skipped'])}")
    return manifest
