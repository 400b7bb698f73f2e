"""Helpers of the data tests: write shards in the docs/architecture.md §2 format directly (no
synthetic generator, no model processor), plant defects in them, and build / drain loaders on them.

* ``write_shards(folder, counts, kinds=..., labels=..., views=...)``: shards of small generated
  samples plus manifest.json; ``kinds`` plants one defect per sample index (see
  ``sample_members``).
* ``add_member`` / ``corrupt_member_header`` / ``png``: raw tar and image bytes for tests that
  assemble or damage shards themselves.
* ``build_loader``: the streaming loader without the model's processor (no too-long exceptions);
  ``cfg_for``, ``ids_of``: its config and transform; ``run_epoch``, ``rank_batches``: drains of
  one rank's loader; ``layout_steps``: the optimizer steps of a whole layout (all its ranks).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image

from aov_dist.data.config import DataConfig, DatasetSpec
from aov_dist.data.stream import build_loader as _build_loader

GOOD = "good"


def build_loader(*args, **kwargs):
    """The loader without the model's processor: these tests must not depend on the model."""
    kwargs.setdefault("too_long_exceptions", ())
    return _build_loader(*args, **kwargs)


def png(size: tuple[int, int] = (8, 6), value: int = 100) -> bytes:
    """PNG bytes of a ``size`` (width, height) RGB image of one grey ``value``."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file ``name`` holding ``data`` appended to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def corrupt_member_header(tar_path: Path, member_name: str) -> None:
    """Overwrite the header checksum field of ``member_name``: tar readers stop at that member."""
    with tarfile.open(tar_path) as tf:
        offset = next(m.offset for m in tf.getmembers() if m.name == member_name)
    data = bytearray(Path(tar_path).read_bytes())
    data[offset + 148:offset + 156] = b"garbage!"  # the header checksum field
    Path(tar_path).write_bytes(bytes(data))


def sample_members(i: int, kind: str = GOOD, prefix: str = "s", label: Optional[int] = 0,
                   views: int = 1) -> dict:
    """Members of sample i (key = zero-padded index); ``kind`` plants one defect."""
    sid = f"{prefix}{i:05d}"
    conv = [{"from": "human", "value": "<image>" * views + "\nIs there a defect?"},
            {"from": "gpt", "value": "No."}]
    meta = {"id": sid, "conversations": conv, "label": label, "label_source": "explicit",
            "images": [f"img/{sid}_{v}.png" for v in range(views)], "source": prefix}
    m = {"__key__": f"{i:06d}", "json": json.dumps(meta).encode()}
    for v in range(views):
        m[f"img{v}.png"] = png(value=(i * 7 + v) % 250)
    if kind == "bad_image":
        m["img0.png"] = b"\x89PNG not really"
    elif kind == "tiny_image":
        m["img0.png"] = png((1, 1))
    elif kind == "bad_json":
        m["json"] = b'{"id": "broken", "conversations": ['
    elif kind == "image_count_mismatch":
        meta["conversations"][0]["value"] = "<image><image>\nTwo?"
        m["json"] = json.dumps(meta).encode()
    return m


def write_shards(folder: Path, counts: list[int], kinds: Optional[dict[int, str]] = None,
                 prefix: str = "s", labels: Optional[dict[int, Optional[int]]] = None,
                 views: Optional[dict[int, int]] = None) -> tuple[str, list[str]]:
    """Shards of the given sizes + manifest.json; returns (manifest path, ids in write order)."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds, labels, views = kinds or {}, labels or {}, views or {}
    shards, ids, i = [], [], 0
    n_lab = {"normal": 0, "anomalous": 0, "unknown": 0}
    for s, cnt in enumerate(counts):
        name = f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for _ in range(cnt):
                lab = labels.get(i, 0)
                n_lab[{0: "normal", 1: "anomalous", None: "unknown"}[lab]] += 1
                w.write(sample_members(i, kinds.get(i, GOOD), prefix, lab, views.get(i, 1)))
                ids.append(f"{prefix}{i:05d}")
                i += 1
        shards.append({"url": name, "samples": cnt, "bytes": (folder / name).stat().st_size,
                       "sha256": ""})
    manifest = {"format": "aov-shards", "version": 1, "writer": "test", "created": "now",
                "sources": [], "shards": shards,
                "totals": {"shards": len(shards), "samples": i, "bytes": 0, "labels": n_lab,
                           "derived_labels": {}}, "skipped": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder / "manifest.json"), ids


def ids_of(sample: dict) -> str:
    """A transform that keeps only the sample's id (module-level: spawned workers import it)."""
    return sample["id"]


def cfg_for(manifest: str, **kw) -> DataConfig:
    """The data config of one dataset ``d`` (weight 1) on ``manifest``; ``kw`` sets the rest."""
    return DataConfig(datasets=[DatasetSpec("d", manifest, 1.0)], **kw)


def run_epoch(loader) -> list[list[str]]:
    """One epoch's batches, each as a list."""
    return [list(b) for b in loader]


def rank_batches(loader, epochs: int, limit: Optional[int] = None) -> list[list]:
    """A rank's micro-batches (as lists) until epoch ``epochs`` starts, or its first ``limit``."""
    out: list[list] = []
    while loader.epoch < epochs:
        for b in loader:
            out.append(list(b))
            if limit is not None and len(out) == limit:
                return out
    return out


def layout_steps(cfg: DataConfig, world: int, global_batch_size: int, epochs: int = 1,
                 states: Optional[list[dict]] = None, counts_before: Optional[tuple[dict, dict]] = None,
                 **kw) -> tuple[list[list[list]], list]:
    """Every optimizer step of a layout of ``world`` ranks (each built with ``states[rank]`` when
    given; rank 0 then given ``counts_before`` as its (skipped, filtered) base, as a resume on
    another world size does) until epoch ``epochs`` starts: per step, the micro-batches of all
    ranks in rank order (place order within the global batch). Returns (steps, the ranks' loaders)."""
    kw.setdefault("transform", ids_of)
    loaders = [build_loader(cfg, r, world, global_batch_size=global_batch_size,
                            state=None if states is None else states[r], **kw) for r in range(world)]
    if counts_before is not None:
        loaders[0].set_counts_before(*counts_before)
    per_rank = [rank_batches(loader, epochs) for loader in loaders]
    accum = loaders[0].accum
    assert len({len(b) for b in per_rank}) == 1, "ranks handed out different numbers of micro-batches"
    steps = [[mb for r in range(world) for mb in per_rank[r][s * accum:(s + 1) * accum]]
             for s in range(len(per_rank[0]) // accum)]
    return steps, loaders


def states_after(cfg: DataConfig, world: int, global_batch_size: int, steps: int) -> list[dict]:
    """The state of every rank of a layout after its first ``steps`` optimizer steps (JSON round trip)."""
    states = []
    for r in range(world):
        loader = build_loader(cfg, r, world, transform=ids_of, global_batch_size=global_batch_size)
        rank_batches(loader, 10 ** 6, limit=steps * loader.accum)
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states
