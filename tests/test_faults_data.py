"""Bad data during a real 2-rank ZeRO-3 run (gloo, no Ray): corrupt tar header, truncated PNG, 1x1
image, missing image member, malformed JSON, <image> count mismatch. Skip mode trains through them
and logs data/skipped_<reason> (summed over ranks) to MLflow; strict mode (data.on_error=fail)
stops with an error naming shard and key. Neither hangs: every run has a deadline."""
from __future__ import annotations

import json
import tarfile
from functools import partial
from pathlib import Path

import pytest

from shard_helpers import add_member, corrupt_member_header, png
from train_harness import run_ranks, tracked_epoch_overrides, train_rank, typed_cfg

pytestmark = pytest.mark.slow
DEADLINE_S = 420  # a rank still running then hangs: the test fails instead of the suite hanging


def bad_shards(src_manifest: Path, out: Path) -> tuple[str, dict[str, int], dict[str, str]]:
    """Copy the synthetic shards into 2 shards with one planted defect per kind.
    Returns (manifest, expected skip counts, {kind: (shard url, key)})."""
    from aov_dist.data.shard_inspect import iter_shard

    manifest = json.loads(src_manifest.read_text())
    samples = [s for e in manifest["shards"] for s in iter_shard(str(src_manifest.parent / e["url"]))]
    single = [i for i, s in enumerate(samples) if len(s.images) == 1 and s.meta.get("label") is not None]
    plan = {single[1]: "bad_image", single[3]: "tiny_image", single[5]: "missing_member",
            single[-6]: "bad_json", single[-8]: "mismatch"}
    out.mkdir()
    half = len(samples) // 2
    parts = [samples[:half], samples[half:]]
    entries, where = [], {}
    for si, part in enumerate(parts):
        name = f"bad-{si:06d}.tar"
        with tarfile.open(out / name, "w") as tf:
            for s in part:
                i = samples.index(s)
                kind = plan.get(i)
                meta = dict(s.meta)
                if kind:
                    where[kind] = (str(out / name), s.key)
                if kind == "mismatch":
                    meta["conversations"] = [dict(t) for t in meta["conversations"]]
                    meta["conversations"][0]["value"] = "<image><image>\n" + meta["conversations"][0]["value"]
                add_member(tf, f"{s.key}.json", b'{"id": "x", "conversations": [' if kind == "bad_json"
                           else json.dumps(meta).encode())
                for v, (img, ext) in enumerate(zip(s.images, s.exts)):
                    if kind == "missing_member":
                        continue
                    data = {"bad_image": img[: len(img) // 3], "tiny_image": png((1, 1), value=90)}.get(kind, img)
                    add_member(tf, f"{s.key}.img{v}.{ext}", data)
        entries.append({"url": name, "samples": len(part), "bytes": (out / name).stat().st_size, "sha256": ""})
    # damage the header of the 3rd-last sample of shard 1: it and the 2 after it are lost, and so is
    # the one before it (the tar ends silently there: the reader cannot tell whether it was cut short)
    tar1 = out / entries[1]["url"]
    key = parts[1][-3].key
    corrupt_member_header(tar1, f"{key}.json")
    where["corrupt_tar"] = (str(tar1), parts[1][-4].key)  # the reader names the last key it read
    manifest = dict(manifest, shards=entries)
    (out / "manifest.json").write_text(json.dumps(manifest))
    expected = {"bad_image": 1, "tiny_image": 1, "image_count_mismatch": 2, "bad_json": 1, "corrupt_tar": 4}
    return str(out / "manifest.json"), expected, where


def test_skip_mode_trains_through_bad_data_and_logs_global_counts(tmp_path, synthetic_shards):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.mlflow_tracker import create_run

    manifest, expected, _ = bad_shards(synthetic_shards.manifest_path, tmp_path / "bad")
    cfg = typed_cfg(tracked_epoch_overrides(manifest, tmp_path, "skip"))
    run_id = create_run(cfg.tracking, "skip", {}, "")
    # every rank finishes (a rank's exception would be raised here) before the deadline
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=partial(train_rank, run_id=run_id), deadline_s=DEADLINE_S)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) >= 3
    # both ranks met bad samples: the summed counts are the planted ones
    summed = {}
    for r in ranks:
        for k, v in r["skipped"].items():
            summed[k] = summed.get(k, 0) + v
    # (every sample of the epoch is read once in its place; a replacement from the refill sequence
    # may meet a bad one again)
    assert all(r["skipped"] for r in ranks)
    assert set(summed) == set(expected) and all(summed[k] >= n for k, n in expected.items()), summed
    client = MlflowClient(cfg.tracking.uri)
    logged = {k[len("data/skipped_"):]: v for k, v in client.get_run(run_id).data.metrics.items()
              if k.startswith("data/skipped_")}
    assert logged == {k: float(v) for k, v in summed.items()}  # the job's counts, not rank 0's
    assert Path(ranks[0]["checkpoints"][-1], "COMMITTED").exists()


def test_strict_mode_stops_with_shard_and_key_and_no_hang(tmp_path, synthetic_shards):
    manifest, _, where = bad_shards(synthetic_shards.manifest_path, tmp_path / "bad")
    cfg = typed_cfg(tracked_epoch_overrides(manifest, tmp_path, "strict", extra=["data.on_error=fail"]))
    cfg.tracking.enabled = False
    # a rank raises (run_ranks fails the test otherwise) before the deadline
    err = run_ranks(cfg, tmp_path / "out", deadline_s=DEADLINE_S, expect_error=True)
    text = str(err)
    named = [(kind, url, key) for kind, (url, key) in where.items() if url in text and repr(key) in text]
    assert "SampleError" in text and named, text[-2000:]
    assert not list((tmp_path / "runs").rglob("COMMITTED"))
