"""Synthetic generator: determinism, label/mask/pixel consistency, and the two file formats."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from aov_dist.data import cli
from aov_dist.data.records import check_file, derive_label, image_list
from aov_dist.data.synth import SynthConfig, generate
from aov_dist.data.synth_images import CLASSES, DEFECTS, render_object
from aov_dist.data.synth_text import DETECTION_PROMPT

LLAVA_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "image", "conversations"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "image": {"oneOf": [{"type": "string"},
                                {"type": "array", "items": {"type": "string"}, "minItems": 2}]},
            "conversations": {"type": "array", "minItems": 2, "items": {
                "type": "object", "required": ["from", "value"], "additionalProperties": False,
                "properties": {"from": {"enum": ["human", "gpt"]}, "value": {"type": "string", "minLength": 1}}}},
            "label": {"enum": ["normal", "anomalous"]},
        },
        "additionalProperties": False,
    },
}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    kw = dict(num_train=14, num_bench=6, image_size=48, multiview_fraction=0.3)
    generate(SynthConfig(out=str(tmp_path / "a"), seed=3, **kw))
    generate(SynthConfig(out=str(tmp_path / "b"), seed=3, **kw))
    generate(SynthConfig(out=str(tmp_path / "c"), seed=4, **kw))
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert len(a) > 20 and a == b
    assert (tmp_path / "a/train/synthetic_instruct.json").read_bytes() != (tmp_path / "c/train/synthetic_instruct.json").read_bytes()
    common = set(a) & set(c)
    assert sum(a[k] != c[k] for k in common if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in common)


@pytest.mark.parametrize("cls", CLASSES)
def test_every_defect_changes_pixels_only_inside_its_mask(cls):
    rng = np.random.default_rng(11)
    for defect in DEFECTS:
        for shot in render_object(rng, cls, defect, 64, views=2):
            diff = np.abs(shot.image.astype(int) - shot.clean.astype(int)).max(axis=-1)
            assert shot.mask.sum() >= 6, (cls, defect)
            assert (diff[~shot.mask] == 0).all(), (cls, defect)
            assert diff[shot.mask].mean() > 60, (cls, defect, diff[shot.mask].mean())
            assert (diff[shot.mask] > 0).all()
            assert shot.defect == defect and shot.location is not None
    normal = render_object(rng, cls, None, 64)[0]
    assert not normal.mask.any() and (normal.image == normal.clean).all() and normal.location is None


def test_location_and_shade_follow_the_mask_within_the_object():
    """The 3x3 cell is taken over the object's bounding box (for a screw, not the image)."""
    from aov_dist.data.synth_images import LOCATIONS, location_of

    obj = np.zeros((90, 90), bool)
    obj[30:60, 0:90] = True  # a wide, flat object in the middle band
    mask = np.zeros_like(obj)
    mask[31:34, 80:85] = True  # top rows of the object, right end
    assert location_of(mask, obj) == "upper right"  # the image grid would say "right"
    rng = np.random.default_rng(5)
    cells = {name: (r, c) for r, row in enumerate(LOCATIONS) for c, name in enumerate(row)}
    seen = set()
    for cls in ("fabric", "screw"):
        for _ in range(12):
            shot = render_object(rng, cls, "hole", 96)[0]
            ys, xs = np.nonzero(shot.mask)
            seen.add(shot.location)
            if cls == "fabric":  # a texture fills the frame but a thin border: close to the image grid
                r, c = cells[shot.location]
                assert abs(ys.mean() * 3 / 96 - (r + 0.5)) < 0.75 and abs(xs.mean() * 3 / 96 - (c + 0.5)) < 0.75
            lum = lambda a: (a[shot.mask].astype(float) @ [0.299, 0.587, 0.114]).mean()  # noqa: E731
            assert shot.shade == ("darker" if lum(shot.image) < lum(shot.clean) else "brighter")
    assert len(seen) >= 4


def test_descriptions_state_the_ground_truth_and_read_back():
    from aov_dist.data.synth_text import describe, explain_turns, read_description

    rng = np.random.default_rng(2)
    for cls in CLASSES:
        for defect in (*DEFECTS, None):
            shot = render_object(rng, cls, defect, 64)[0]
            facts = read_description(describe(shot))
            assert facts == {"anomalous": "yes" if defect else "no", "defect": defect,
                             "location": shot.location, "cls": cls}
            turns = explain_turns(rng, shot)
            assert [k for k, _, _ in turns] == (["low-level", "low-level", "complex", "complex"] if defect
                                                else ["low-level"])
            if defect:
                assert shot.shade in turns[1][2]
    assert read_description("Yes. There is a stain in the top of the screw and a small hole.")["defect"] is None
    assert read_description("garbage") == {"anomalous": None, "defect": None, "location": None, "cls": None}


def test_labels_masks_and_folders_agree(synthetic_data):
    records = json.loads(synthetic_data.train_json.read_text())
    jsonschema.validate(records, LLAVA_SCHEMA)
    assert len(records) == synthetic_data.num_train
    root = synthetic_data.image_root
    for rec in records:
        paths = image_list(rec)
        anomalous = rec["label"] == "anomalous"
        assert derive_label({k: v for k, v in rec.items() if k != "label"})[0] == int(anomalous)
        for p in paths:
            cls, split, kind, name = p.split("/")
            mask_path = root / cls / "ground_truth" / kind / name.replace(".png", "_mask.png")
            assert (kind != "good") == anomalous and (split == "test" or not anomalous)
            if anomalous:
                mask = np.asarray(Image.open(mask_path)) > 0
                assert mask.any()
            else:
                assert not mask_path.exists()
            assert Image.open(root / p).size == (64, 64)
    assert not list(root.glob("*/ground_truth/good"))
    for cls in CLASSES:  # normals of every class in both MVTec folders
        assert list(root.glob(f"{cls}/train/good/*.png")) and list(root.glob(f"{cls}/test/good/*.png"))


def test_records_are_balanced_valid_and_in_the_paper_format(synthetic_data):
    checked = check_file(str(synthetic_data.train_json), str(synthetic_data.image_root))
    assert checked.errors == [] and len(checked.valid) == synthetic_data.num_train
    records = [c.record for c in checked.valid]
    by_class = Counter(image_list(r)[0].split("/")[0] for r in records)
    assert max(by_class.values()) - min(by_class.values()) <= 1 and len(by_class) == len(CLASSES)
    labels = Counter(r["label"] for r in records)
    assert abs(labels["normal"] - labels["anomalous"]) <= 1
    assert any(isinstance(r["image"], list) and len(r["image"]) == 4 for r in records)
    for r in records:
        first = r["conversations"][0]["value"]
        assert first.count("<image>") == len(image_list(r))  # all placeholders in the first turn
    detection = [r for r in records if r["conversations"][0]["value"].endswith(DETECTION_PROMPT)]
    assert detection and all(r["conversations"][1]["value"] == ("Yes" if r["label"] == "anomalous" else "No")
                             for r in detection)


def test_benchmark_files_and_held_out_images(synthetic_data):
    bench = synthetic_data.benchmark_dir
    detection = json.loads(synthetic_data.detection_json.read_text())
    reasoning = json.loads(synthetic_data.reasoning_json.read_text())
    assert len(detection) == synthetic_data.num_bench
    for d in detection:
        parts = d["image"].split("/")
        assert parts[0] == "VisA" and parts[1] in CLASSES and isinstance(d["anomaly"], bool)
        assert parts[4] == ("Anomaly" if d["anomaly"] else "Normal")
        assert (bench / d["image"]).is_file()
    assert Counter(d["anomaly"] for d in detection) == {True: 10, False: 10}
    # every held-out image has reasoning questions: four about a defect, one for a normal image
    assert [r["id"] for r in reasoning] == [d["id"] for d in detection]
    for r, d in zip(reasoning, detection):
        humans = [t for t in r["conversations"][0::2]]
        assert all(t["from"] == "human" and t["type"] in ("low-level", "complex") for t in humans)
        assert [t["type"] for t in humans] == (["low-level", "low-level", "complex", "complex"] if d["anomaly"]
                                               else ["low-level"])
        assert all(t["from"] == "gpt" and t["value"] for t in r["conversations"][1::2])
        assert humans[0]["value"].startswith("<image>\n")
        assert (r["defect"] is not None) == d["anomaly"] == (r["location"] is not None)
        assert r["conversations"][1]["value"].startswith("Yes. " if d["anomaly"] else "No. ")
    train_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in synthetic_data.image_root.rglob("*.png")}
    bench_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (bench / "VisA").rglob("Images/*/*.png")}
    assert bench_hashes and not (train_hashes & bench_hashes)


def test_explicit_label_fraction_zero_leaves_labels_to_the_folders(tmp_path):
    res = generate(SynthConfig(out=str(tmp_path), num_train=12, num_bench=0, image_size=40,
                               explicit_label_fraction=0.0))
    records = json.loads(Path(res.train_json).read_text())
    assert all("label" not in r for r in records)
    assert Counter(derive_label(r) for r in records) == {(0, "folder"): 6, (1, "folder"): 6}


def test_cli_synth_and_its_argument_errors(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--num-train", "6", "--num-bench", "2",
                     "--image-size", "40", "--classes", "tile,fabric"]) == 0
    records = json.loads((tmp_path / "train/synthetic_instruct.json").read_text())
    assert {image_list(r)[0].split("/")[0] for r in records} == {"tile", "fabric"}
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--classes", "teapot"]) == 2
    assert "teapot" in capsys.readouterr().err


def test_shape_weights_pick_the_conversation_shapes(tmp_path):
    """(1, 0, 0): every record is the bare detection exchange; the weights land in meta.json."""
    res = generate(SynthConfig(out=str(tmp_path), num_train=24, num_bench=0, image_size=48,
                               multiview_fraction=0.0, shape_weights=(1.0, 0.0, 0.0)))
    records = json.loads(Path(res.train_json).read_text())
    assert {len(r["conversations"]) for r in records} == {2}
    assert {r["conversations"][1]["value"] for r in records} == {"Yes", "No"}
    assert json.loads((tmp_path / "meta.json").read_text())["shape_weights"] == [1.0, 0.0, 0.0]
    res = generate(SynthConfig(out=str(tmp_path / "explain"), num_train=24, num_bench=0, image_size=48,
                               multiview_fraction=0.0, shape_weights=(0.0, 1.0, 0.0)))
    records = json.loads(Path(res.train_json).read_text())
    assert {len(r["conversations"]) for r in records} == {2, 8}  # normal: what-and-where; defect: 4 turns
    assert all(r["conversations"][1]["value"].startswith("Yes. " if r["label"] == "anomalous" else "No. ")
               for r in records)
    with pytest.raises(ValueError, match="shape_weights"):
        SynthConfig(out=str(tmp_path), shape_weights=(0.5, 0.2, 0.2)).check()
