"""A sample of records read from shard manifests, for planning (no model package, no pixel decode).

What a planner needs of a record is its conversations, its label and the (height, width) of each
image: the sizes come from the image headers (``PIL.Image.open(...).size`` reads only the header),
so even a sample of real ~1500x1000 images reads fast. The sample is spread over the shards (the
first ``k`` samples of up to ``max_shards`` evenly spaced shards per dataset) because shards are
often written source by source, and the first shard alone would show one source only.

Records the loader would skip are counted by the loader's reason codes (``decode.SKIP_REASONS``)
instead of being returned; a manifest that cannot be read is reported per dataset, never raised.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from aov_dist import storage
from aov_dist.data.decode import IMAGE_TOKEN, SampleError, iter_tar_samples
from aov_dist.data.plan import DatasetIndex, load_manifest

_IMG_SUFFIX = re.compile(r"^img(\d+)\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class SampledRecord:
    id: str
    dataset: str
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) per image, in placeholder order
    conversations: list[dict]
    label: Optional[int]


@dataclass
class DatasetSample:
    name: str
    manifest: str
    total: int = 0  # samples in the manifest
    shards_total: int = 0
    shards_read: int = 0
    error: Optional[str] = None  # the manifest could not be read


@dataclass
class DataSample:
    records: list[SampledRecord] = field(default_factory=list)
    datasets: list[DatasetSample] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # decode.SKIP_REASONS -> count


def spread_shards(num_shards: int, max_shards: int) -> list[int]:
    """Indices of up to ``max_shards`` evenly spaced shards, first and last included."""
    k = min(num_shards, max(1, max_shards))
    if k == 1:
        return [0]
    return sorted({round(i * (num_shards - 1) / (k - 1)) for i in range(k)})


def sample_records(datasets: list[tuple[str, str, float]], samples: int = 512, max_shards: int = 16,
                   min_image_side: int = 2, endpoint_url: Optional[str] = None) -> DataSample:
    """Read about ``samples`` records from ``datasets`` = [(name, manifest URL, weight)], shared
    among the datasets by weight (at least one record each)."""
    out = DataSample()
    weight_sum = sum(w for _, _, w in datasets) or 1.0
    for name, manifest, weight in datasets:
        ds = DatasetSample(name, manifest)
        out.datasets.append(ds)
        try:
            index = load_manifest(manifest, name, lambda u: storage.open_url(u, "rb", endpoint_url))
        except Exception as e:  # missing file, no credentials, bad JSON: report, keep planning
            ds.error = f"{type(e).__name__}: {e}"
            continue
        ds.total, ds.shards_total = index.total, len(index.shards)
        want = max(1, round(samples * weight / weight_sum))
        _read_dataset(index, ds, want, max_shards, min_image_side, endpoint_url, out)
    return out


def _read_dataset(index: DatasetIndex, ds: DatasetSample, want: int, max_shards: int, min_image_side: int,
                  endpoint_url: Optional[str], out: DataSample) -> None:
    chosen = [i for i in spread_shards(len(index.shards), max_shards) if index.shards[i].samples > 0]
    per_shard = math.ceil(want / max(1, len(chosen)))
    taken = 0
    for si in chosen:
        if taken >= want:
            break
        shard = index.shards[si]
        stop = min(per_shard, want - taken, shard.samples)
        ds.shards_read += 1
        try:
            with storage.open_url(shard.url, "rb", endpoint_url) as f:
                for item in iter_tar_samples(f, shard.url, stop=stop):
                    taken += 1
                    if isinstance(item, SampleError):
                        _count(out.skipped, item.reason)
                        continue
                    key, members = item
                    record = parse_record(members, ds.name, min_image_side)
                    if isinstance(record, str):
                        _count(out.skipped, record)
                    else:
                        out.records.append(record)
        except OSError:
            _count(out.skipped, "corrupt_tar")


def parse_record(members: dict[str, bytes], dataset: str, min_image_side: int = 2) -> SampledRecord | str:
    """A record from its tar members, or the loader's skip reason (decode.py) when it would be skipped."""
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        conversations = meta["conversations"]
        n_placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in conversations)
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        return "bad_json"
    images = sorted((int(m.group(1)), s) for s in members if (m := _IMG_SUFFIX.match(s)))
    if [i for i, _ in images] != list(range(len(images))) or len(images) != n_placeholders:
        return "image_count_mismatch"
    sizes = []
    for _, suffix in images:
        try:
            width, height = Image.open(io.BytesIO(members[suffix])).size  # header only
        except Exception:  # PIL raises many types for a bad header
            return "bad_image"
        if min(width, height) < min_image_side:
            return "tiny_image"
        sizes.append((height, width))
    label = meta.get("label")
    return SampledRecord(str(meta.get("id")), dataset, tuple(sizes), conversations,
                         label if label in (0, 1) and not isinstance(label, bool) else None)


def _count(table: dict[str, int], reason: str) -> None:
    table[reason] = table.get(reason, 0) + 1
