"""Record validation, label derivation, shard writer and inspect (local folders)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from aov_dist import __version__
from aov_dist.data import cli
from aov_dist.data.records import RecordFileError, check_file, derive_label, image_list
from aov_dist.data.shard_inspect import inspect_shards, iter_shard
from aov_dist.data.shards import ShardError, write_shards
from shard_helpers import add_member

DETECT = "<image>\nAre there any defects for the object in the image? Please reply with 'Yes' or 'No'."


def _png(path: Path, colour=(10, 200, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return str(path)


def _rec(rid, image, answer="Yes", **extra):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": DETECT},
                                                          {"from": "gpt", "value": answer}], **extra}


def _write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def _all_samples(shard_dir: Path, manifest: dict):
    return [s for e in manifest["shards"] for s in iter_shard(str(shard_dir / e["url"]))]


def test_round_trip_is_byte_identical_and_manifest_matches(synthetic_shards):
    m, d = synthetic_shards.manifest, synthetic_shards.dir
    records = json.loads(synthetic_shards.data.train_json.read_text())
    assert m["format"] == "aov-shards" and m["version"] == 1 and m["writer"] == f"aov-dist {__version__}"
    assert m["totals"]["shards"] == len(m["shards"]) >= 3
    assert m["totals"]["samples"] == len(records) and m["skipped"] == []
    assert m["sources"] == [{"path": str(synthetic_shards.data.train_json), "records": len(records),
                             "sha256": hashlib.sha256(synthetic_shards.data.train_json.read_bytes()).hexdigest()}]
    for e in m["shards"]:
        data = (d / e["url"]).read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    samples = _all_samples(d, m)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(len(records))]
    for rec, s in zip(records, samples):
        want_label = 1 if rec["label"] == "anomalous" else 0
        assert s.meta == {"id": rec["id"], "conversations": rec["conversations"], "label": want_label,
                          "label_source": "explicit", "images": image_list(rec), "source": "synthetic_instruct"}
        assert s.images == [(synthetic_shards.data.image_root / p).read_bytes() for p in image_list(rec)]
        assert s.exts == ["png"] * len(s.images)
    assert m["totals"]["labels"] == {"normal": 20, "anomalous": 20, "unknown": 0}
    report = inspect_shards(str(d))
    assert report.ok, report.all_problems()


def test_shards_are_reproducible(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    args = dict(image_root=str(synthetic_data.image_root), shard_size_mb=0.1)
    m1 = write_shards([str(synthetic_data.train_json)], str(tmp_path / "a"), **args)
    m2 = write_shards([str(synthetic_data.train_json)], str(tmp_path / "b"), **args)
    assert m1 == m2 and m1["created"] == "2023-11-14T22:13:20Z"
    for name in [e["url"] for e in m1["shards"]] + ["manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / m1["shards"][0]["url"]) as tar:
        assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in tar.getmembers()} == {(946684800, 0, 0, "", 0o644)}


@pytest.fixture
def bad_records(tmp_path):
    """A record file with one valid record and one of each kind of invalid record."""
    good = _png(tmp_path / "img" / "a" / "test" / "scratch" / "0.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _png(tmp_path / "outside.png")
    conv2 = [{"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "again"}]
    records = [
        _rec("ok", "a/test/scratch/0.png"),
        _rec("missing", "a/nope.png"),
        _rec("unreadable", "broken.png"),
        {"id": "tokens", "image": ["a/test/scratch/0.png", "a/test/scratch/0.png"],
         "conversations": [{"from": "human", "value": DETECT}, {"from": "gpt", "value": "No"}]},
        {"id": "roles", "image": "a/test/scratch/0.png", "conversations": conv2},
        {"id": "empty", "image": "a/test/scratch/0.png",
         "conversations": [{"from": "human", "value": DETECT}, {"from": "gpt", "value": "  "}]},
        _rec("escape", "../outside.png"),
        _rec("badlabel", "a/test/scratch/0.png", label="maybe"),
        "not a record",
    ]
    assert good
    return _write_json(tmp_path / "records.json", records), str(tmp_path / "img")


@pytest.mark.parametrize("index,rid,needle", [
    (1, "missing", "missing image file"),
    (2, "unreadable", "unreadable image"),
    (3, "tokens", "1 <image> token(s) for 2 image(s)"),
    (4, "roles", "roles must alternate human/gpt"),
    (5, "empty", "empty or non-string 'value'"),
    (6, "escape", "leaves the image root"),
    (7, "badlabel", "unrecognised label value 'maybe'"),
    (8, None, "record is a str"),
])
def test_each_invalid_record_kind_is_reported_with_file_index_and_id(bad_records, index, rid, needle):
    path, root = bad_records
    checked = check_file(path, root)
    assert [c.id for c in checked.valid] == ["ok"] and checked.n_records == 9
    mine = [str(e) for e in checked.errors if e.index == index]
    assert mine and any(needle in m for m in mine), mine
    assert all(m.startswith(f"{path}: record {index} (id={rid!r}): ") for m in mine)


def test_malformed_json_is_a_file_level_error(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": 1,')
    with pytest.raises(RecordFileError, match=f"{bad}: malformed JSON"):
        check_file(str(bad))
    with pytest.raises(ShardError, match=str(bad)):
        write_shards([str(bad)], str(tmp_path / "out"), on_error="skip")
    assert not (tmp_path / "out").exists()


def test_fail_writes_nothing_and_skip_lists_the_skipped(bad_records, tmp_path):
    path, root = bad_records
    with pytest.raises(ShardError, match=r"record 1 \(id='missing'\): missing image file") as err:
        write_shards([path], str(tmp_path / "fail"), image_root=root, on_error="fail")
    assert "nothing was written" in str(err.value)
    assert not (tmp_path / "fail").exists()
    m = write_shards([path], str(tmp_path / "skip"), image_root=root, on_error="skip")
    assert m["totals"]["samples"] == 1 and m["sources"][0]["records"] == 9
    assert [(s["file"], s["index"], s["id"]) for s in m["skipped"]] == \
        [(path, i, rid) for i, rid in enumerate(["missing", "unreadable", "tokens", "roles", "empty",
                                                 "escape", "badlabel", None], start=1)]
    assert "missing image file" in m["skipped"][0]["reason"]
    assert inspect_shards(str(tmp_path / "skip")).ok


@pytest.mark.parametrize("record,expected", [
    ({"label": "anomalous"}, (1, "explicit")), ({"label": "Normal"}, (0, "explicit")),
    ({"anomaly": True}, (1, "explicit")), ({"is_anomaly": 0}, (0, "explicit")),
    ({"label": "defective"}, (1, "explicit")), ({"label": "good"}, (0, "explicit")),
    ({"image": "bottle/train/good/000.png"}, (0, "folder")),
    ({"image": "bottle/test/broken_large/000.png"}, (1, "folder")),
    ({"image": "VisA/pcb1/Data/Images/Anomaly/000.JPG"}, (1, "folder")),
    ({"image": "VisA/pcb1/Data/Images/Normal/000.JPG"}, (0, "folder")),
    ({"image": ["x/good/0.png", "x/test/crack/1.png"]}, (1, "folder")),
    ({"image": ["x/good/0.png", "web/1.png"], "conversations": [
        {"from": "human", "value": DETECT}, {"from": "gpt", "value": "No."}]}, (0, "qa")),
    ({"image": "web/cat.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A part."},
        {"from": "human", "value": "Is there any anomaly? Answer yes or no."},
        {"from": "gpt", "value": "Yes, a dent."}]}, (1, "qa")),
    ({"image": "web/cat.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Yes."}]}, (None, None)),
    ({"image": "bottle/test/000.png"}, (None, None)),
])
def test_label_derivation_rules(record, expected):
    assert derive_label(record) == expected


def test_manifest_counts_how_labels_were_derived(tmp_path):
    img = tmp_path / "img"
    _png(img / "m" / "train" / "good" / "0.png")
    _png(img / "m" / "test" / "hole" / "1.png")
    _png(img / "web" / "2.jpg")
    records = [
        _rec("e", "web/2.jpg", "No", label="anomalous"),  # explicit beats the answer
        _rec("f1", "m/train/good/0.png", "Yes"),  # folder beats the answer
        _rec("f2", "m/test/hole/1.png"),
        _rec("q", "web/2.jpg", "No"),
        {"id": "u", "image": "web/2.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                            {"from": "gpt", "value": "A box."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]},
    ]
    m = write_shards([_write_json(tmp_path / "r.json", records)], str(tmp_path / "out"), image_root=str(img))
    assert m["totals"]["derived_labels"] == {"explicit": 1, "folder": 2, "qa": 1}
    assert m["totals"]["labels"] == {"normal": 2, "anomalous": 2, "unknown": 2}
    metas = {s.meta["id"]: s for s in _all_samples(tmp_path / "out", m)}
    assert [(metas[k].meta["label"], metas[k].meta["label_source"]) for k in "e f1 f2 q u t".split()] == \
        [(1, "explicit"), (0, "folder"), (1, "folder"), (0, "qa"), (None, None), (None, None)]
    assert metas["t"].images == [] and metas["q"].exts == ["jpg"]


def test_inspect_names_the_shard_on_any_mismatch(synthetic_shards, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(synthetic_shards.dir, d)
    name = synthetic_shards.manifest["shards"][1]["url"]
    data = bytearray((d / name).read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    (d / name).write_bytes(bytes(data))
    report = inspect_shards(str(d))
    assert not report.ok and any(name in p and "sha256" in p for p in report.all_problems())
    assert cli.main(["inspect", str(d), "--no-decode"]) == 1
    (d / name).unlink()
    assert any(f"{name}: shard file is missing" in p for p in inspect_shards(str(d)).all_problems())


def test_inspect_refuses_unsafe_members_and_urls(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "../000000000.json", b"{}")
    (d / "shard-000000.tar").write_bytes(buf.getvalue())
    manifest = {"format": "aov-shards", "version": 1, "shards": [
        {"url": "shard-000000.tar", "samples": 0, "bytes": 0, "sha256": ""},
        {"url": "../outside.tar", "samples": 0, "bytes": 0, "sha256": ""}], "totals": {}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    problems = inspect_shards(str(d)).all_problems()
    assert any("shard-000000.tar: unexpected or unsafe member '../000000000.json'" in p for p in problems)
    assert any("../outside.tar: unsafe shard URL" in p for p in problems)
    assert not (tmp_path / "000000000.json").exists()


def test_existing_shard_set_needs_overwrite(synthetic_data, tmp_path):
    out = tmp_path / "out"
    args = dict(image_root=str(synthetic_data.image_root))
    m = write_shards([str(synthetic_data.train_json)], str(out), shard_size_mb=0.05, **args)
    assert len(m["shards"]) > 1
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ShardError, match="--overwrite"):
        write_shards([str(synthetic_data.train_json)], str(out), **args)
    m2 = write_shards([str(synthetic_data.train_json)], str(out), overwrite=True, **args)
    assert len(m2["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "shard-000000.tar"]
    assert inspect_shards(str(out)).ok


def test_cli_shard_and_inspect(synthetic_data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["shard", "--input", str(synthetic_data.train_json), "--image-root",
                     str(synthetic_data.image_root), "--out", str(out), "--shard-size-mb", "0.2",
                     "--prefix", "syn"]) == 0
    assert (out / "syn-000000.tar").is_file()
    assert cli.main(["inspect", str(out / "manifest.json")]) == 0
    assert "all shards match the manifest" in capsys.readouterr().out
    assert cli.main(["shard", "--input", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 1
    assert "none.json" in capsys.readouterr().err
    assert cli.main(["shard", "--input", str(synthetic_data.train_json), "--out", str(tmp_path / "y"),
                     "--prefix", "../up"]) == 1
