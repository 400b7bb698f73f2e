"""Check a shard set against its manifest (``aov-data inspect``) and read shards back.

``inspect_shards`` re-reads every shard once, streaming: it recomputes size and sha256, parses
every member (names must be exactly ``<key>.json`` / ``<key>.img<i>.<ext>``: anything else, such as
``../x`` or a folder, is refused, so nothing here can write outside a folder), decodes every image,
checks that keys run 0..N-1 across shards and that the manifest's totals (samples, bytes, labels,
label derivations) equal what the shards hold. Each problem names its shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator, Optional

from PIL import Image

from aov_dist import storage
from aov_dist.data.shards import FORMAT, MANIFEST, MEMBER_RE, VERSION, image_ext

_SAMPLE_KEYS = {"id": str, "conversations": list, "images": list, "source": str}


class ShardFormatError(ValueError):
    """A shard or manifest does not follow the format; the message names the shard."""


@dataclass
class ShardSample:
    key: str
    meta: dict
    images: list[bytes]
    exts: list[str]


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    manifest_url: str
    manifest: dict
    shards: list[ShardReport]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.shards)

    def all_problems(self) -> list[str]:
        return self.problems + [p for s in self.shards for p in s.problems]


class _HashingReader:
    def __init__(self, raw: IO[bytes]):
        self.raw, self.count, self.sha = raw, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def manifest_url(url: str) -> str:
    """Accept a shard folder or the manifest file itself."""
    return url if url.endswith(".json") else storage.join_url(url, MANIFEST)


def read_manifest(url: str, endpoint_url: Optional[str] = None) -> tuple[dict, str]:
    """(manifest, its folder URL); ShardFormatError when missing or not ours."""
    murl = manifest_url(url)
    try:
        manifest = json.loads(storage.read_bytes(murl, endpoint_url).decode("utf-8"))
    except FileNotFoundError as e:
        raise ShardFormatError(f"{murl}: no manifest (an incomplete or missing shard set)") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{murl}: malformed manifest JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardFormatError(f"{murl}: not an {FORMAT} version {VERSION} manifest")
    return manifest, storage.dirname_url(murl)


def _check_meta(meta: object, key: str, n_images: int, exts: list[str]) -> list[str]:
    if not isinstance(meta, dict):
        return [f"sample {key}: json is not an object"]
    problems = [f"sample {key}: field {k!r} missing or not a {t.__name__}"
                for k, t in _SAMPLE_KEYS.items() if not isinstance(meta.get(k), t)]
    if meta.get("label") not in (0, 1, None) or isinstance(meta.get("label"), bool):
        problems.append(f"sample {key}: label {meta.get('label')!r} is not 0, 1 or null")
    images = meta.get("images") if isinstance(meta.get("images"), list) else []
    if len(images) != n_images:
        problems.append(f"sample {key}: json lists {len(images)} image(s), shard holds {n_images}")
    elif [image_ext(str(p)) for p in images] != exts:
        problems.append(f"sample {key}: image member extensions {exts} differ from the original paths")
    return problems


def _parse(raw: IO[bytes], shard: str) -> Iterator[ShardSample]:
    """Yield the samples of one tar stream, refusing any unexpected member (name or type)."""
    current: Optional[ShardSample] = None
    with tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            match = MEMBER_RE.match(member.name)
            if not match or not member.isfile():
                raise ShardFormatError(f"{shard}: unexpected or unsafe member {member.name!r}")
            data = tar.extractfile(member).read()
            key = match.group("key")
            if match.group("i") is None:  # <key>.json opens a sample
                if current is not None:
                    yield current
                try:
                    meta = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ShardFormatError(f"{shard}: {member.name}: malformed JSON: {e}") from e
                current = ShardSample(key, meta, [], [])
                continue
            if current is None or current.key != key or int(match.group("i")) != len(current.images):
                raise ShardFormatError(f"{shard}: member {member.name!r} is out of order (json first, "
                                       "then img0, img1, ... of the same key)")
            current.images.append(data)
            current.exts.append(match.group("ext"))
    if current is not None:
        yield current


def iter_shard(url: str, endpoint_url: Optional[str] = None) -> Iterator[ShardSample]:
    """Read back the samples of one shard (for tests and tools; the training reader is stream.py)."""
    with storage.open_url(url, "rb", endpoint_url) as f:
        yield from _parse(f, url)


def _inspect_shard(entry: dict, base: str, first_key: int, decode: bool, endpoint_url: Optional[str],
                   labels: Counter, derived: Counter) -> ShardReport:
    rel = str(entry.get("url"))
    try:
        url = storage.join_url(base, rel)
    except ValueError:
        return ShardReport(rel, problems=[f"{rel}: unsafe shard URL in the manifest"])
    rep = ShardReport(url)
    try:
        f = storage.open_url(url, "rb", endpoint_url)
    except FileNotFoundError:
        rep.problems.append(f"{url}: shard file is missing")
        return rep
    with f:
        reader = _HashingReader(f)
        try:
            for sample in _parse(reader, url):
                expect = f"{first_key + rep.samples:0{len(sample.key)}d}"
                if sample.key != expect:
                    rep.problems.append(f"{url}: key {sample.key} where {expect} was expected")
                rep.problems += [f"{url}: {p}" for p in _check_meta(sample.meta, sample.key, len(sample.images), sample.exts)]
                if decode:
                    for i, data in enumerate(sample.images):
                        try:
                            with Image.open(io.BytesIO(data)) as im:
                                im.load()
                        except Exception as e:  # PIL raises many types for corrupt data
                            rep.problems.append(f"{url}: sample {sample.key} image {i} does not decode: {e}")
                meta = sample.meta if isinstance(sample.meta, dict) else {}
                labels[{0: "normal", 1: "anomalous"}.get(meta.get("label"), "unknown")] += 1
                if meta.get("label_source"):
                    derived[meta["label_source"]] += 1
                rep.samples += 1
        except (ShardFormatError, tarfile.TarError, EOFError) as e:
            rep.problems.append(f"{url}: unreadable tar: {e}" if not isinstance(e, ShardFormatError) else str(e))
        reader.drain()
    rep.bytes, rep.sha256 = reader.count, reader.sha.hexdigest()
    for what, got in (("samples", rep.samples), ("bytes", rep.bytes), ("sha256", rep.sha256)):
        if entry.get(what) != got:
            rep.problems.append(f"{url}: {what} is {got}, the manifest says {entry.get(what)}")
    return rep


def inspect_shards(url: str, decode_images: bool = True, endpoint_url: Optional[str] = None) -> InspectReport:
    """Validate a shard set (folder or manifest URL) against its manifest; never raises for content."""
    manifest, base = read_manifest(url, endpoint_url)
    labels, derived = Counter(), Counter()
    reports, first_key = [], 0
    for entry in manifest.get("shards", []):
        rep = _inspect_shard(entry if isinstance(entry, dict) else {}, base, first_key, decode_images,
                             endpoint_url, labels, derived)
        reports.append(rep)
        first_key += rep.samples
    totals = manifest.get("totals", {})
    problems = []
    expected = {"shards": len(reports), "samples": sum(r.samples for r in reports),
                "bytes": sum(r.bytes for r in reports),
                "labels": {k: labels[k] for k in ("normal", "anomalous", "unknown")},
                "derived_labels": {k: derived[k] for k in ("explicit", "folder", "qa")}}
    for k, v in expected.items():
        if totals.get(k) != v:
            problems.append(f"{manifest_url(url)}: totals.{k} is {totals.get(k)}, the shards hold {v}")
    return InspectReport(manifest_url(url), manifest, reports, problems)
