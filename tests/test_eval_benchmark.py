"""VisA-D&R reader: the synthetic benchmark, the official-script shape, and clear errors."""
import json

import pytest

from aov_dist.eval.benchmark import COMPLEX, LOW_LEVEL, UNMARKED, BenchmarkError, load_benchmark, load_image


@pytest.fixture(scope="module")
def synth_bench(tmp_path_factory):
    from aov_dist.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    res = generate(SynthConfig(out=str(out), num_train=0, num_bench=12, image_size=32))
    return res.benchmark_dir


def _write(folder, detection=None, reasoning=None):
    if detection is not None:
        (folder / "detection.json").write_text(json.dumps(detection))
    if reasoning is not None:
        (folder / "reasoning.json").write_text(json.dumps(reasoning))
    return str(folder)


def test_reads_the_synthetic_benchmark(synth_bench):
    b = load_benchmark(synth_bench)
    raw = json.load(open(f"{synth_bench}/detection.json"))
    assert len(b.detection) == len(raw) == 12
    assert [d.image for d in b.detection] == [r["image"] for r in raw]
    assert all(d.cls == d.image.split("/")[1] for d in b.detection)
    assert sum(d.anomaly for d in b.detection) == 6 and [r.image for r in b.reasoning] == [d.image for d in b.detection]
    normal, item = (next(r for r, d in zip(b.reasoning, b.detection) if d.anomaly == a) for a in (False, True))
    assert [t.kind for t in normal.turns] == [LOW_LEVEL] and normal.turns[0].reference.startswith("No.")
    assert [t.kind for t in item.turns] == [LOW_LEVEL, LOW_LEVEL, COMPLEX, COMPLEX]
    assert "<image>" not in item.turns[0].question and item.turns[0].reference.startswith("Yes.")
    img = load_image(synth_bench, item.image)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_official_script_shape_and_limit(tmp_path):
    root = _write(tmp_path,
                  detection=[{"image": "VisA/candle/a.JPG", "anomaly": 1}, {"image": "VisA/pcb1/b.JPG", "anomaly": False}],
                  reasoning=[{"image": "VisA/pcb1/b.JPG", "questions": ["<image>\nWhat is wrong?", "Why?"],
                              "answers": ["A bent pin.", "Handling."], "types": ["low-level", "complex"]},
                             {"image": "VisA/pcb1/c.JPG", "questions": ["Q"], "references": ["R"]}])
    b = load_benchmark(root)
    assert [(d.cls, d.anomaly) for d in b.detection] == [("candle", True), ("pcb1", False)]
    assert b.reasoning[0].turns[0].question == "What is wrong?"
    assert [t.kind for t in b.reasoning[0].turns] == [LOW_LEVEL, COMPLEX]
    assert b.reasoning[1].turns[0].kind == UNMARKED
    assert len(load_benchmark(root, limit=1).detection) == 1
    limited = load_benchmark(root, reasoning_limit=1)  # reasoning only: detection keeps both records
    assert (len(limited.detection), len(limited.reasoning)) == (2, 1)
    assert (len(load_benchmark(root, limit=1, reasoning_limit=2).reasoning)) == 2
    assert load_benchmark(root, reasoning_file=None).reasoning == []


@pytest.mark.parametrize("record, message", [
    ({"image": "VisA/candle/a.JPG", "anomaly": "yes"}, r"record 1: 'anomaly' must be true/false"),
    ({"image": "a.JPG", "anomaly": True}, r"record 1: image path 'a.JPG' has no class folder"),
    ({"anomaly": True}, r"record 1: 'image' must be a non-empty string"),
    ("VisA/candle/a.JPG", r"record 1: expected an object"),
])
def test_bad_detection_record_names_file_and_index(tmp_path, record, message):
    root = _write(tmp_path, detection=[{"image": "VisA/candle/ok.JPG", "anomaly": False}, record])
    with pytest.raises(BenchmarkError, match=r"detection\.json " + message):
        load_benchmark(root, reasoning_file=None)


@pytest.mark.parametrize("record, message", [
    ({"image": "VisA/c/x.png", "questions": ["q1", "q2"], "answers": ["a1"]}, "one reference per question"),
    ({"image": "VisA/c/x.png", "conversations": [{"from": "human", "value": "q", "type": "hard"},
                                                 {"from": "gpt", "value": "a"}]}, "turn 0: unknown question type 'hard'"),
    ({"image": "VisA/c/x.png", "conversations": [{"from": "gpt", "value": "a"},
                                                 {"from": "human", "value": "q"}]}, "turn 0: expected a 'human'"),
    ({"image": "VisA/c/x.png"}, "needs 'conversations' or 'questions'"),
])
def test_bad_reasoning_record_names_file_and_index(tmp_path, record, message):
    root = _write(tmp_path, reasoning=[record])
    with pytest.raises(BenchmarkError, match=r"reasoning\.json record 0.*" + message):
        load_benchmark(root, detection_file=None)


def test_file_level_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="detection.json: file not found"):
        load_benchmark(str(tmp_path))
    (tmp_path / "detection.json").write_text("{not json")
    with pytest.raises(BenchmarkError, match="detection.json: invalid JSON"):
        load_benchmark(str(tmp_path))
    (tmp_path / "detection.json").write_text('{"image": "x"}')
    with pytest.raises(BenchmarkError, match="expected a JSON list of records, got dict"):
        load_benchmark(str(tmp_path))


def test_image_paths_cannot_escape_the_benchmark(tmp_path):
    with pytest.raises(BenchmarkError, match="unsafe relative path"):
        load_image(str(tmp_path), "../VisA/candle/a.png")


def test_reads_from_s3_like_local(synth_bench, s3_bucket):
    from aov_dist import storage

    s3_fs, _ = storage.get_fs(s3_bucket)
    s3_fs.put(synth_bench + "/", s3_bucket[len("s3://"):] + "/bench/", recursive=True)
    remote = load_benchmark(s3_bucket + "/bench")
    local = load_benchmark(synth_bench)
    assert remote.detection == local.detection and remote.reasoning == local.reasoning
    item = local.detection[3]
    assert load_image(s3_bucket + "/bench", item.image).tobytes() == load_image(synth_bench, item.image).tobytes()


def test_checkpoint_materialize_from_s3(tmp_path, s3_bucket):
    from aov_dist import storage
    from aov_dist.eval.checkpoints import CheckpointError, materialize, resolve

    step = tmp_path / "run" / "step_7"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text("{}")
    (step / "COMMITTED").write_text("")
    s3_fs, _ = storage.get_fs(s3_bucket)
    s3_fs.put(str(tmp_path / "run") + "/", s3_bucket[len("s3://"):] + "/run/", recursive=True)
    uri = s3_bucket + "/run/step_7"
    assert resolve(uri, "unused") == uri
    assert resolve(None, s3_bucket) == uri  # discovery of the latest committed step works on S3 too
    local = materialize(uri, cache_dir=str(tmp_path))
    assert open(f"{local}/config.json").read() == "{}"
    # a local step folder resolves to its hf/ subfolder; without the marker it is refused
    assert materialize(str(step)) == str(step / "hf")
    (step / "COMMITTED").unlink()
    with pytest.raises(CheckpointError, match="no COMMITTED marker"):
        resolve(str(step), "unused")


def test_latest_local_checkpoint_picks_newest_committed(tmp_path):
    import os

    from aov_dist.eval.checkpoints import CheckpointError, latest_local_checkpoint, resolve

    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        resolve(None, str(tmp_path))
    for i, (run, step, committed) in enumerate([("a", 5, True), ("a", 10, True), ("b", 3, True), ("b", 8, False)]):
        d = tmp_path / run / f"step_{step}"
        d.mkdir(parents=True)
        if committed:
            (d / "COMMITTED").write_text("")
            os.utime(d / "COMMITTED", (1000 + i, 1000 + i))
    assert latest_local_checkpoint(str(tmp_path)) == str(tmp_path / "b" / "step_3")
