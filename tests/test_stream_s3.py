"""Streaming loader against the loopback S3 server and on the real shard writer's output."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from aov_dist import storage
from aov_dist.data.config import DataConfig, DatasetSpec
from shard_helpers import build_loader, cfg_for, layout_steps, states_after, write_shards


def _upload(folder: Path, prefix: str) -> str:
    for p in sorted(folder.iterdir()):
        storage.write_bytes(f"{prefix}/{p.name}", p.read_bytes())
    return f"{prefix}/manifest.json"


def test_s3_reads_the_same_as_local_and_resumes_on_another_world_size(tmp_path: Path, s3_bucket: str) -> None:
    manifest, _ = write_shards(tmp_path, [9, 9, 9, 9, 5], kinds={4: "bad_json"})
    s3_manifest = _upload(tmp_path, f"{s3_bucket}/shards/v1")
    local = cfg_for(manifest, micro_batch_size=2, num_workers=2, block_size=4)
    remote = cfg_for(s3_manifest, micro_batch_size=2, num_workers=2, block_size=4)
    full_local, _ = layout_steps(local, 2, 8, epochs=2)
    full_remote, loaders = layout_steps(remote, 2, 8, epochs=2)
    assert full_remote == full_local and len(full_local) == 10
    assert sum(loader.skipped.get("bad_json", 0) for loader in loaders) >= 2  # once per epoch at least
    # 2 ranks stop after 3 steps; 1 rank with 2 workers goes on from rank 1's state
    state = states_after(remote, 2, 8, steps=3)[1]
    rest, _ = layout_steps(remote, 1, 8, epochs=2, states=[state])
    assert rest == full_local[3:]


def test_s3_missing_manifest_names_the_url(s3_bucket: str) -> None:
    import pytest

    url = f"{s3_bucket}/nothing/manifest.json"
    with pytest.raises(FileNotFoundError, match="nothing/manifest.json"):
        build_loader(cfg_for(url, num_workers=0), 0, 1)


def test_reads_the_shard_writer_output(synthetic_shards) -> None:
    records = json.loads(Path(synthetic_shards.data.train_json).read_text())
    by_id = {r["id"]: r for r in records}
    cfg = DataConfig(datasets=[DatasetSpec("synthetic", str(synthetic_shards.manifest_path))],
                     micro_batch_size=1, num_workers=0, block_size=8)
    loader = build_loader(cfg, 0, 1)
    samples = [s for b in loader for s in b]
    assert loader.skipped == {}
    total = synthetic_shards.manifest["totals"]["samples"]
    assert len(samples) == total and len({s["id"] for s in samples}) == total
    for s in samples:
        rec = by_id[s["id"]]
        n_img = 1 if isinstance(rec["image"], str) else len(rec["image"])
        assert len(s["images"]) == n_img
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in s["images"])
        assert s["conversations"] == rec["conversations"]
        assert s["label"] in (0, 1, None)
        assert s["__url__"].endswith(".tar") and s["__key__"].isdigit()
    # stage 1 on the same shards: only labelled single-image samples
    s1 = build_loader(cfg, 0, 1, stage="stage1")
    stage1 = [s for b in s1 for s in b]
    assert stage1 and all(s["label"] in (0, 1) and len(s["images"]) == 1 for s in stage1)
    assert len(stage1) == s1.batches_per_epoch
