"""Synthetic data in the Anomaly-Instruct and VisA-D&R formats (``aov-data synth``).

Layout written under ``OUT`` (every file byte-identical for the same arguments)::

    OUT/meta.json                                  generator arguments (no timestamps)
    OUT/train/synthetic_instruct.json              LLaVA records (Anomaly-Instruct format)
    OUT/train/images/<class>/train/good/000012.png           normal (half of them)
    OUT/train/images/<class>/test/good/000014.png            normal (the other half)
    OUT/train/images/<class>/test/<defect>/000013.png        anomalous
    OUT/train/images/<class>/ground_truth/<defect>/000013_mask.png   its mask (MVTec convention)
    OUT/benchmark/detection.json                   VisA-D&R detection file
    OUT/benchmark/reasoning.json                   VisA-D&R reasoning file
    OUT/benchmark/VisA/<class>/Data/Images/{Normal,Anomaly}/007.png
    OUT/benchmark/VisA/<class>/Data/Masks/Anomaly/007.png

Training records: ``{"id", "image": "<class>/test/<defect>/000013.png" | [4 paths], "conversations",
"label": "anomalous" | "normal"}``; paths are relative to ``OUT/train/images`` (the shard writer's
``--image-root``). ``label`` is our explicit label (the released Anomaly-Instruct JSON has none);
``--explicit-label-fraction`` < 1 leaves it out of some records so that the writer derives them from
the folders, as it must for the real data. Multi-view records list 4 views of one object; every
view of an anomalous object shows a defect of the same kind.

Benchmark (held-out images from a different seed stream, single view):

* detection.json: ``[{"id", "image": "VisA/<class>/Data/Images/Anomaly/007.png", "anomaly": bool}]``
  (the class is the second path component; the question is the paper's detection prompt,
  ``synth_text.DETECTION_PROMPT``);
* reasoning.json: every image, ``[{"id", "image", "class", "defect", "location", "shade",
  "conversations": [{"from": "human", "value", "type": "low-level" | "complex"},
  {"from": "gpt", "value": <reference answer>}, ...]}]``; the first human turn carries ``<image>``.
  An anomalous image gets four questions (what and where, its look, cause, remedy), a normal one
  the first only, answered "No. ... looks normal" (``defect``, ``location``, ``shade`` are null):
  a model that describes a defect on every image does not score well. The ground-truth keys let
  ``synth_text.read_description`` check generated answers fact by fact.

Classes are balanced (round-robin) and normal:anomalous is 1:1 within every class. Each image has
its own random stream ``default_rng([seed, stream, index])`` (stream 0 train, 1 benchmark), so the
benchmark never shares an image with the training set and any sample can be regenerated alone.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from aov_dist import __version__
from aov_dist.data.synth_images import CLASSES, DEFECTS, SynthImage, render_object
from aov_dist.data.synth_text import SHAPE_WEIGHTS, instruct_conversation, reasoning_conversation

TRAIN_STREAM, BENCH_STREAM, ORDER_STREAM = 0, 1, 2
TRAIN_JSON = "synthetic_instruct.json"
MULTIVIEW_VIEWS = 4


@dataclass
class SynthConfig:
    out: str
    seed: int = 0
    num_train: int = 1200
    num_bench: int = 240
    image_size: int = 112
    multiview_fraction: float = 0.1
    explicit_label_fraction: float = 1.0
    classes: tuple[str, ...] = CLASSES
    # conversation shapes (detect, explain, describe_first); see synth_text
    shape_weights: tuple[float, float, float] = SHAPE_WEIGHTS

    def check(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size}: must be >= 32 px for visible defects")
        if self.num_train < 0 or self.num_bench < 0:
            raise ValueError("num_train and num_bench must be >= 0")
        for name in ("multiview_fraction", "explicit_label_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be within [0, 1]")
        if len(self.shape_weights) != 3 or min(self.shape_weights) < 0 or abs(sum(self.shape_weights) - 1) > 1e-6:
            raise ValueError(f"shape_weights={self.shape_weights}: three non-negative weights summing to 1")
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or not self.classes:
            raise ValueError(f"unknown classes {unknown}; choose among {list(CLASSES)}")


@dataclass
class SynthResult:
    train_json: str
    image_root: str
    benchmark_dir: str
    detection_json: str
    reasoning_json: str
    num_train_records: int
    num_train_images: int
    num_bench_images: int


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def plan(index: int, classes: Sequence[str], rng: np.random.Generator) -> tuple[str, Optional[str]]:
    """Class and defect of sample ``index``: round-robin classes; normal/anomalous alternate both
    within a class and across the classes of one round, so any prefix is balanced to within 1."""
    rnd, pos = divmod(index, len(classes))
    cls = classes[pos]
    anomalous = (rnd + pos) % 2 == 1
    return cls, (DEFECTS[int(rng.integers(len(DEFECTS)))] if anomalous else None)


def generate_train(cfg: SynthConfig) -> tuple[list[dict], int]:
    root = os.path.join(cfg.out, "train", "images")
    records, n_images = [], 0
    for i in range(cfg.num_train):
        rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, i])
        cls, defect = plan(i, cfg.classes, rng)
        views = MULTIVIEW_VIEWS if rng.random() < cfg.multiview_fraction else 1
        shots = render_object(rng, cls, defect, cfg.image_size, views)
        # A class's normals come every other round: alternate them between train/good and test/good.
        split = "test" if defect or (i // len(cfg.classes) // 2) % 2 else "train"
        folder = f"{cls}/{split}/{defect or 'good'}"
        stems = [f"{i:06d}" if views == 1 else f"{i:06d}_v{k}" for k in range(views)]
        paths = [f"{folder}/{stem}.png" for stem in stems]
        for stem, path, shot in zip(stems, paths, shots):
            _write(os.path.join(root, path), png_bytes(shot.image))
            if defect:
                _write(os.path.join(root, cls, "ground_truth", defect, f"{stem}_mask.png"),
                       png_bytes(shot.mask.astype(np.uint8) * 255))
        n_images += views
        record = {"id": f"syn_{cfg.seed}_{i:06d}", "image": paths[0] if views == 1 else paths,
                  "conversations": instruct_conversation(rng, shots[0], views, tuple(cfg.shape_weights))}
        if rng.random() < cfg.explicit_label_fraction:
            record["label"] = "anomalous" if defect else "normal"
        records.append(record)
    order = np.random.default_rng([cfg.seed, ORDER_STREAM]).permutation(len(records))
    return [records[j] for j in order], n_images


def generate_benchmark(cfg: SynthConfig) -> tuple[list[dict], list[dict]]:
    root = os.path.join(cfg.out, "benchmark")
    detection, reasoning = [], []
    counters: dict[tuple[str, bool], int] = {}
    for i in range(cfg.num_bench):
        rng = np.random.default_rng([cfg.seed, BENCH_STREAM, i])
        cls, defect = plan(i, cfg.classes, rng)
        shot: SynthImage = render_object(rng, cls, defect, cfg.image_size)[0]
        n = counters[(cls, bool(defect))] = counters.get((cls, bool(defect)), -1) + 1
        kind = "Anomaly" if defect else "Normal"
        rel = f"VisA/{cls}/Data/Images/{kind}/{n:03d}.png"
        _write(os.path.join(root, rel), png_bytes(shot.image))
        sample_id = f"visa_syn_{cfg.seed}_{i:05d}"
        detection.append({"id": sample_id, "image": rel, "anomaly": bool(defect)})
        if defect:
            _write(os.path.join(root, f"VisA/{cls}/Data/Masks/Anomaly/{n:03d}.png"),
                   png_bytes(shot.mask.astype(np.uint8) * 255))
        reasoning.append({"id": sample_id, "image": rel, "class": cls, "defect": defect,
                          "location": shot.location, "shade": shot.shade,
                          "conversations": reasoning_conversation(rng, shot)})
    return detection, reasoning


def generate(cfg: SynthConfig) -> SynthResult:
    """Write the training set and the benchmark under ``cfg.out``; see the module docstring."""
    cfg.check()
    records, n_images = generate_train(cfg)
    train_json = os.path.join(cfg.out, "train", TRAIN_JSON)
    _write(train_json, _json_bytes(records))
    detection, reasoning = generate_benchmark(cfg)
    bench = os.path.join(cfg.out, "benchmark")
    _write(os.path.join(bench, "detection.json"), _json_bytes(detection))
    _write(os.path.join(bench, "reasoning.json"), _json_bytes(reasoning))
    meta = {"generator": f"aov-dist {__version__}", **{k: v for k, v in asdict(cfg).items() if k != "out"}}
    meta["classes"] = list(cfg.classes)
    _write(os.path.join(cfg.out, "meta.json"), _json_bytes(meta))
    return SynthResult(train_json=train_json, image_root=os.path.join(cfg.out, "train", "images"),
                       benchmark_dir=bench, detection_json=os.path.join(bench, "detection.json"),
                       reasoning_json=os.path.join(bench, "reasoning.json"),
                       num_train_records=len(records), num_train_images=n_images,
                       num_bench_images=len(detection))
