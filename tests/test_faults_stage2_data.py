"""Too-long and text-only samples in a real 2-rank stage-2 ZeRO-3 run (gloo, no Ray; the spawned
ranks of train_harness.run_ranks).

The shards are laid out so that the loader's plan gives one rank only image samples (two of them
with 8 views: their image tokens alone exceed data.max_length) and the other rank only text-only
samples: each shard is a single block (8 samples, data.block_size 64) and the 2 micro-batch places
of a global batch (4 / 2) read one lane each, a lane being half the block order, i.e. one shard
(a too-long sample's replacement may come from the other shard). So in steps one rank's
micro-batch has no image at all while the other's has: under ZeRO-3 that rank must still run the
vision modules (the model's ``vision_dummy_for_text_only``) or the parameter all-gathers of the
two ranks no longer match and the job hangs. Skip mode: the run finishes with finite losses, ``data/skipped_too_long`` in MLflow
is the sum over ranks. Strict mode: a ``SampleError`` naming the shard and key of a too-long sample.
"""
from __future__ import annotations

import json
import math
import tarfile
from functools import partial
from pathlib import Path

import pytest

from shard_helpers import add_member
from train_harness import run_ranks, tracked_epoch_overrides, train_rank, typed_cfg

pytestmark = pytest.mark.slow
DEADLINE_S = 420  # a rank still running then hangs: the test fails instead of the suite hanging
PER_SHARD = 8  # samples per shard = per lane = per rank (2 ranks, 2 equal shards): 4 steps of 2 x 2 samples
TOO_LONG_VIEWS = 8  # 8 views x 64 px: image tokens end at 637 (tiny processor)
MAX_LENGTH = 400  # a single 64 px image ends at 167, a 4-view sample at 325


def stage2_shards(src_manifest: Path, out: Path) -> tuple[str, list[tuple[str, str]]]:
    """An image shard (single-image samples, 2 of them made 8-view) and a text-only shard.
    Returns (manifest, [(shard url, key) of each too-long sample])."""
    from aov_dist.data.shard_inspect import iter_shard

    manifest = json.loads(src_manifest.read_text())
    samples = [s for e in manifest["shards"] for s in iter_shard(str(src_manifest.parent / e["url"]))]
    single = [s for s in samples if len(s.images) == 1][:PER_SHARD]
    out.mkdir()
    too_long, entries = [], []
    with tarfile.open(out / "img-000000.tar", "w") as tf:
        for i, s in enumerate(single):
            meta, images = dict(s.meta), list(s.images)
            if i in (2, 5):  # one early and one late in the range: both met whatever the shuffle
                images = images * TOO_LONG_VIEWS
                first = meta["conversations"][0]
                text = first["value"].replace("<image>\n", "").replace("<image>", "")
                meta["conversations"] = [dict(first, value="<image>\n" * TOO_LONG_VIEWS + text),
                                         *meta["conversations"][1:]]
                meta["images"] = [meta["images"][0]] * TOO_LONG_VIEWS
                too_long.append((str(out / "img-000000.tar"), s.key))
            add_member(tf, f"{s.key}.json", json.dumps(meta).encode())
            for v, img in enumerate(images):
                add_member(tf, f"{s.key}.img{v}.{s.exts[0]}", img)
    entries.append({"url": "img-000000.tar", "samples": PER_SHARD})
    with tarfile.open(out / "txt-000001.tar", "w") as tf:
        for i in range(PER_SHARD):
            meta = {"id": f"text_only_{i}", "label": None, "images": [], "source": "text",
                    "conversations": [{"from": "human", "value": f"Name a way to inspect part {i} for defects."},
                                      {"from": "gpt", "value": "Look at it under raking light and compare "
                                                              "with a known good part."}]}
            add_member(tf, f"{100000 + i:09d}.json", json.dumps(meta).encode())
    entries.append({"url": "txt-000001.tar", "samples": PER_SHARD})
    for e in entries:
        e.update(bytes=(out / e["url"]).stat().st_size, sha256="")
    (out / "manifest.json").write_text(json.dumps(dict(manifest, shards=entries)))
    return str(out / "manifest.json"), too_long


def _stage2(manifest: str, tmp_path: Path, run: str, extra=()) -> list[str]:
    return tracked_epoch_overrides(manifest, tmp_path, run, extra=["stage=stage2", "stage.require_init=false",
                                                       f"data.max_length={MAX_LENGTH}", *extra])


def _text_only_beside_images(cfg) -> int:
    """Steps in which one rank's micro-batch has no image and the other rank's has (the loaders of
    both ranks rebuilt here, deterministic plans: exactly what the training ranks read)."""
    from aov_dist.model.presets import tiny_processor
    from aov_dist.train.tasks import make_task

    task, processor = make_task("stage2"), tiny_processor()
    per_rank = [[int(b["pixel_values"].shape[0]) for b in task.build_loader(cfg, processor, r, 2)] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == PER_SHARD // 2
    return sum(1 for a, b in zip(*per_rank) if min(a, b) == 0 < max(a, b))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_stage2_too_long_and_text_only_samples_train_without_hanging(tmp_path, synthetic_shards, packing):
    """Packed too: a sample too long for a row is counted, never split across rows."""
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.mlflow_tracker import create_run

    manifest, too_long = stage2_shards(synthetic_shards.manifest_path, tmp_path / "s2")
    cfg = typed_cfg(_stage2(manifest, tmp_path, "s2skip", extra=[f"data.packing={packing}"]))
    assert _text_only_beside_images(cfg) >= 1  # the premise: a text-only micro-batch on one rank only
    run_id = create_run(cfg.tracking, "s2skip", {}, "")
    # no hang (deadline), no crash (a rank's exception would be raised here)
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=partial(train_rank, run_id=run_id), deadline_s=DEADLINE_S)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == PER_SHARD // 2
    assert all(math.isfinite(x) and x > 0 for x in ranks[0]["losses"]), ranks[0]["losses"]
    # only the image rank meets the too-long samples (a refill may meet one again: >=)
    summed: dict[str, int] = {}
    for r in ranks:
        for k, v in r["skipped"].items():
            summed[k] = summed.get(k, 0) + v
    assert set(summed) == {"too_long"} and summed["too_long"] >= len(too_long), [r["skipped"] for r in ranks]
    assert sorted(bool(r["skipped"]) for r in ranks) == [False, True]
    logged = {k: v for k, v in MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics.items()
              if k.startswith("data/skipped_")}
    assert logged == {"data/skipped_too_long": float(summed["too_long"])}  # the job's count, not rank 0's
    assert Path(ranks[0]["checkpoints"][-1], "COMMITTED").exists()


def test_stage2_strict_mode_names_the_too_long_shard_and_key(tmp_path, synthetic_shards):
    manifest, too_long = stage2_shards(synthetic_shards.manifest_path, tmp_path / "s2")
    cfg = typed_cfg(_stage2(manifest, tmp_path, "s2strict", extra=["data.on_error=fail"]))
    cfg.tracking.enabled = False
    # a rank raises (run_ranks fails the test otherwise) before the deadline
    err = run_ranks(cfg, tmp_path / "out", deadline_s=DEADLINE_S, expect_error=True)
    text = str(err)
    named = [key for url, key in too_long if f"too_long: shard {url} sample {key!r}" in text]
    assert "SampleError" in text and named, text[-2000:]
    assert not list((tmp_path / "runs").rglob("COMMITTED"))


def stop_on_too_many_skips(cfg, rank: int, world: int) -> dict:
    """A rank that reports the skip policy's failure instead of dying of it."""
    from aov_dist.data.skip_policy import TooManySkippedSamples

    try:
        return {"failed": None, **train_rank(cfg, rank, world)}
    except TooManySkippedSamples as e:
        return {"failed": str(e)}


def test_too_many_too_long_samples_stop_every_rank_naming_data_max_length(tmp_path, synthetic_shards):
    manifest, _ = stage2_shards(synthetic_shards.manifest_path, tmp_path / "s2")
    # windows of 4 samples read: the first window holds a skipped 8-view sample (1 in 5 = 20 %)
    cfg = typed_cfg(_stage2(manifest, tmp_path, "s2limit", extra=["data.skip_window=4", "data.fail_skip_fraction=0.1",
                                                                  "data.max_skip_fraction=0.05"]))
    cfg.tracking.enabled = False
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=stop_on_too_many_skips, deadline_s=300)
    messages = [r["failed"] for r in ranks]
    assert messages[0] is not None and messages[0] == messages[1], messages  # same verdict, same step
    assert "too_long" in messages[0] and "data.max_length" in messages[0] and "data.fail_skip_fraction=0.1" in messages[0]
    assert not list((tmp_path / "runs").rglob("COMMITTED"))  # stopped before its first checkpoint
