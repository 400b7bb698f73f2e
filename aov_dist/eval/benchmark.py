"""VisA-D&R reader: detection and multi-turn reasoning files, local or s3://.

Detection file (JSON list, or JSON Lines): records ``{"image": "VisA/<class>/...", "anomaly": bool}``.
The class is the second component of the image path (paper protocol); an explicit ``"class"``
key wins when present. ``anomaly`` may also be 0/1.

Reasoning file: one record per anomalous image, in either shape
  * official-script shape: ``{"image", "questions": [str], "answers": [str]}`` (``"references"`` is
    accepted for ``"answers"``), optional ``"types": [str]`` (one per question);
  * LLaVA shape: ``{"image", "conversations": [{"from": "human", "value": q}, {"from": "gpt",
    "value": a}, ...]}``; the kind of a question comes from a ``"type"`` key on either turn.
Question kinds: ``low-level`` or ``complex`` (``low_level``/``lowlevel``/``low`` also accepted).
A question without a kind is ``unmarked`` and only counts in the overall reasoning scores.
``<image>`` placeholders in questions are dropped: the predictor puts one in front of the first
question, as the official scripts do.

Any malformed record raises BenchmarkError naming the file and the record index.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from aov_dist import storage

LOW_LEVEL = "low-level"
COMPLEX = "complex"
UNMARKED = "unmarked"
_KIND_ALIASES = {
    "low-level": LOW_LEVEL, "low_level": LOW_LEVEL, "lowlevel": LOW_LEVEL, "low": LOW_LEVEL,
    "complex": COMPLEX, "complex-reasoning": COMPLEX, "complex_reasoning": COMPLEX,
}


class BenchmarkError(ValueError):
    """A benchmark file or record that cannot be used; the message names file and index."""


@dataclass(frozen=True)
class DetectionItem:
    index: int
    image: str
    cls: str
    anomaly: bool


@dataclass(frozen=True)
class ReasoningTurn:
    question: str
    reference: str
    kind: str


@dataclass(frozen=True)
class ReasoningItem:
    index: int
    image: str
    cls: str
    turns: tuple[ReasoningTurn, ...]


@dataclass
class Benchmark:
    root: str
    detection: list[DetectionItem] = field(default_factory=list)
    reasoning: list[ReasoningItem] = field(default_factory=list)


# ---------------------------------------------------------------- file access (local or s3://)
# All storage access goes through aov_dist.data.fs (the one place that knows the S3 endpoint rules).

def read_bytes(url: str) -> bytes:
    return storage.read_bytes(url)


def exists(url: str) -> bool:
    return storage.exists(url)


def join(root: str, rel: str) -> str:
    """``rel`` under ``root``; paths that could escape the folder (``..``, absolute) are refused."""
    try:
        return storage.join_url(root, rel)
    except ValueError as e:
        raise BenchmarkError(f"{e} (under {root})") from e


def load_image(root: str, rel: str, max_side: int = 1024) -> Image.Image:
    """RGB image; the long side is capped at ``max_side`` keeping the aspect ratio."""
    url = join(root, rel)
    try:
        img = Image.open(io.BytesIO(read_bytes(url))).convert("RGB")
    except FileNotFoundError as e:
        raise BenchmarkError(f"image {url} not found") from e
    if max_side and max(img.size) > max_side:
        w, h = img.size
        scale = max_side / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return img


def load_records(url: str) -> list[Any]:
    """The records of a benchmark file (.json array or .jsonl), local or remote."""
    try:
        text = read_bytes(url).decode("utf-8")
    except FileNotFoundError as e:
        raise BenchmarkError(f"{url}: file not found") from e
    if url.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{url} line {i + 1}: invalid JSON: {e}") from e
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{url}: invalid JSON: {e}") from e
    if not isinstance(data, list):
        raise BenchmarkError(f"{url}: expected a JSON list of records, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- record parsing

def class_of(image: str, where: str) -> str:
    parts = [p for p in image.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 3:
        raise BenchmarkError(
            f"{where}: image path {image!r} has no class folder (class = second path component, "
            "e.g. 'VisA/candle/...')")
    return parts[1]


def _image_of(rec: Any, where: str) -> str:
    if not isinstance(rec, dict):
        raise BenchmarkError(f"{where}: expected an object, got {type(rec).__name__}")
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        raise BenchmarkError(f"{where}: 'image' must be a non-empty string, got {image!r}")
    return image


def parse_detection(rec: Any, index: int, url: str) -> DetectionItem:
    where = f"{url} record {index}"
    image = _image_of(rec, where)
    label = rec.get("anomaly")
    if isinstance(label, bool):
        anomaly = label
    elif isinstance(label, int) and label in (0, 1):
        anomaly = bool(label)
    else:
        raise BenchmarkError(f"{where}: 'anomaly' must be true/false (or 0/1), got {label!r}")
    cls = rec.get("class") if isinstance(rec.get("class"), str) else class_of(image, where)
    return DetectionItem(index=index, image=image, cls=cls, anomaly=anomaly)


def _kind(raw: Any, where: str) -> str:
    if raw is None:
        return UNMARKED
    kind = _KIND_ALIASES.get(str(raw).strip().lower())
    if kind is None:
        raise BenchmarkError(f"{where}: unknown question type {raw!r}; expected 'low-level' or 'complex'")
    return kind


def _clean_question(q: Any, where: str) -> str:
    if not isinstance(q, str) or not q.strip():
        raise BenchmarkError(f"{where}: question must be a non-empty string, got {q!r}")
    return q.replace("<image>", "").strip()


def _turns_from_lists(rec: dict, where: str) -> list[ReasoningTurn]:
    questions = rec.get("questions")
    answers = rec.get("answers", rec.get("references"))
    if not isinstance(questions, list) or not questions:
        raise BenchmarkError(f"{where}: 'questions' must be a non-empty list")
    if not isinstance(answers, list) or len(answers) != len(questions):
        raise BenchmarkError(
            f"{where}: 'answers' must be a list with one reference per question "
            f"({len(questions)} questions, got {answers!r:.80})")
    types = rec.get("types", [None] * len(questions))
    if not isinstance(types, list) or len(types) != len(questions):
        raise BenchmarkError(f"{where}: 'types' must hold one entry per question")
    turns = []
    for t, (q, a, k) in enumerate(zip(questions, answers, types)):
        if not isinstance(a, str):
            raise BenchmarkError(f"{where} turn {t}: reference answer must be a string, got {a!r}")
        turns.append(ReasoningTurn(_clean_question(q, f"{where} turn {t}"), a, _kind(k, f"{where} turn {t}")))
    return turns


def _turns_from_conversation(rec: dict, where: str) -> list[ReasoningTurn]:
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        raise BenchmarkError(f"{where}: 'conversations' must be a non-empty list of human/gpt pairs")
    turns = []
    for t in range(0, len(conv), 2):
        human, gpt = conv[t], conv[t + 1]
        tw = f"{where} turn {t // 2}"
        if not (isinstance(human, dict) and human.get("from") == "human"
                and isinstance(gpt, dict) and gpt.get("from") == "gpt"):
            raise BenchmarkError(f"{tw}: expected a 'human' message followed by a 'gpt' message")
        if not isinstance(gpt.get("value"), str):
            raise BenchmarkError(f"{tw}: reference answer must be a string")
        raw_kind = human.get("type", gpt.get("type"))
        turns.append(ReasoningTurn(_clean_question(human.get("value"), tw), gpt["value"], _kind(raw_kind, tw)))
    return turns


def parse_reasoning(rec: Any, index: int, url: str) -> ReasoningItem:
    where = f"{url} record {index}"
    image = _image_of(rec, where)
    if "conversations" in rec:
        turns = _turns_from_conversation(rec, where)
    elif "questions" in rec:
        turns = _turns_from_lists(rec, where)
    else:
        raise BenchmarkError(f"{where}: needs 'conversations' or 'questions'+'answers'")
    cls = rec.get("class") if isinstance(rec.get("class"), str) else class_of(image, where)
    return ReasoningItem(index=index, image=image, cls=cls, turns=tuple(turns))


def load_benchmark(root: str, detection_file: Optional[str] = "detection.json",
                   reasoning_file: Optional[str] = "reasoning.json",
                   limit: Optional[int] = None, reasoning_limit: Optional[int] = None) -> Benchmark:
    """Read the benchmark folder ``root``; a file name of None skips that part. ``limit`` keeps the
    first records of each file, ``reasoning_limit`` (when set) those of the reasoning file."""
    bench = Benchmark(root=root)
    for part, name, parse, keep in (("detection", detection_file, parse_detection, limit),
                                    ("reasoning", reasoning_file, parse_reasoning,
                                     limit if reasoning_limit is None else reasoning_limit)):
        if not name:
            continue
        url = join(root, name)
        items = [parse(r, i, url) for i, r in enumerate(load_records(url)[:keep])]
        if not items:
            raise BenchmarkError(f"{url}: no records")
        setattr(bench, part, items)
    return bench
