"""The shard writer and inspect against a loopback S3 server (moto) through s3fs."""
from __future__ import annotations

import hashlib
import json

import pytest

from aov_dist import storage
from aov_dist.data import cli
from aov_dist.data.records import image_list
from aov_dist.data.shard_inspect import inspect_shards, iter_shard
from aov_dist.data.shards import ShardError, write_shards


def test_fs_helpers_on_s3(s3_bucket, s3_server):
    url = storage.join_url(s3_bucket + "/a/b", "c.txt")
    assert url == s3_bucket + "/a/b/c.txt"
    assert not storage.exists(url)
    storage.write_bytes(url, b"hello")
    assert storage.exists(url) and storage.read_bytes(url) == b"hello" and storage.size(url) == 5
    assert storage.list_names(s3_bucket + "/a/b") == ["c.txt"]
    assert storage.dirname_url(url) == s3_bucket + "/a/b"
    assert storage.s3_endpoint() == s3_server and storage.s3_endpoint("http://x:1") == "http://x:1"
    with pytest.raises(ValueError, match="unsafe relative path"):
        storage.join_url(s3_bucket, "../other-bucket/x")


def test_round_trip_through_s3(synthetic_data, synthetic_shards, s3_bucket):
    out = s3_bucket + "/shards/synthetic"
    m = write_shards([str(synthetic_data.train_json)], out, image_root=str(synthetic_data.image_root),
                     shard_size_mb=0.1)
    local = synthetic_shards.manifest
    # Same inputs, same bytes: S3 output equals the local shards (hashes), manifest written last.
    assert [(e["url"], e["sha256"], e["bytes"]) for e in m["shards"]] == \
        [(e["url"], e["sha256"], e["bytes"]) for e in local["shards"]]
    stored = json.loads(storage.read_bytes(out + "/manifest.json"))
    assert stored["shards"] == m["shards"] and stored["totals"] == m["totals"]
    report = inspect_shards(out)
    assert report.ok, report.all_problems()
    records = json.loads(synthetic_data.train_json.read_text())
    samples = [s for e in m["shards"] for s in iter_shard(out + "/" + e["url"])]
    assert [s.meta["id"] for s in samples] == [r["id"] for r in records]
    for rec, s in zip(records, samples):
        assert s.images == [(synthetic_data.image_root / p).read_bytes() for p in image_list(rec)]
    assert cli.main(["inspect", out]) == 0


def test_local_shard_folder_copied_to_s3_still_inspects(synthetic_shards, s3_bucket):
    # Relative manifest URLs: a folder copied to s3:// unchanged stays valid.
    dest = s3_bucket + "/copied"
    for p in synthetic_shards.dir.iterdir():
        storage.write_bytes(storage.join_url(dest, p.name), p.read_bytes())
    report = inspect_shards(dest + "/manifest.json")
    assert report.ok, report.all_problems()
    assert [r.sha256 for r in report.shards] == [
        hashlib.sha256((synthetic_shards.dir / e["url"]).read_bytes()).hexdigest()
        for e in synthetic_shards.manifest["shards"]]


def test_fail_mode_writes_nothing_to_s3_and_tampering_is_caught(synthetic_data, s3_bucket, tmp_path):
    records = json.loads(synthetic_data.train_json.read_text())
    records[3]["image"] = "nowhere/missing.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(ShardError, match=rf"{bad}: record 3 \(id='{records[3]['id']}'\): missing image file"):
        write_shards([str(bad)], s3_bucket + "/fail", image_root=str(synthetic_data.image_root), on_error="fail")
    assert storage.list_names(s3_bucket + "/fail") == []
    out = s3_bucket + "/skip"
    m = write_shards([str(bad)], out, image_root=str(synthetic_data.image_root), on_error="skip")
    assert [(s["index"], s["id"]) for s in m["skipped"]] == [(3, records[3]["id"])]
    first = out + "/" + m["shards"][0]["url"]
    storage.write_bytes(first, storage.read_bytes(first)[:-1024])  # truncate the shard
    problems = inspect_shards(out).all_problems()
    assert any(first in p and "bytes" in p for p in problems)
