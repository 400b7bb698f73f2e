"""Validation of LLaVA-style record files and derivation of normal/anomalous labels.

A record is ``{"id", "image": str | [str, ...] (optional: text-only), "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}``. ``check_record`` lists everything wrong with one record;
each problem becomes a ``RecordError`` naming the file, the record index and its id. A file that
is not a JSON list of objects is a ``RecordFileError`` naming the file.

Labels (``derive_label``), first rule that gives one wins:

1. ``explicit``: a field ``label`` / ``anomaly`` / ``is_anomaly`` / ``anomalous`` / ``is_anomalous``
   holding a bool, 0/1, or a word (normal, good, ok, negative / anomalous, anomaly, abnormal,
   defective, defect, bad, positive, yes/no, true/false); an unrecognised value is an error;
2. ``folder``: the image paths: a ``good`` / ``normal`` / ``ok`` folder means normal; ``test/<x>``
   with x not good (MVTec AD), or an ``anomaly`` / ``anomalous`` / ``abnormal`` / ``bad`` /
   ``defect`` folder (VisA style) means anomalous. Every image must give a label; a multi-view record
   is anomalous when any view is;
3. ``qa``: the gpt reply right after a human turn that asks the Yes/No detection question: "yes..."
   means anomalous, "no..." normal;

else the label is None and the record is for stage 2 only. Labels are 1 anomalous / 0 normal.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from aov_dist import storage

LABEL_KEYS = ("label", "anomaly", "is_anomaly", "anomalous", "is_anomalous")
_NORMAL_WORDS = {"normal", "good", "ok", "negative", "no", "false", "0", "nominal"}
_ANOMALOUS_WORDS = {"anomalous", "anomaly", "abnormal", "defective", "defect", "bad", "positive",
                    "yes", "true", "1"}
_NORMAL_DIRS = {"good", "normal", "ok"}
_ANOMALOUS_DIRS = {"anomaly", "anomalous", "abnormal", "bad", "defect", "defective"}
_DETECTION_QUESTION = re.compile(r"(any|an?)\s+(defects?|anomal\w*)\b.*\b(yes|no)\b", re.I | re.S)
IMAGE_TOKEN = "<image>"


class RecordFileError(ValueError):
    """A whole record file is unusable (unreadable, not JSON, not a list of objects)."""


@dataclass
class RecordError:
    file: str
    index: int
    id: Optional[str]
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.index} (id={self.id!r}): {self.reason}"

    def as_dict(self) -> dict:
        return {"file": self.file, "index": self.index, "id": self.id, "reason": self.reason}


@dataclass
class CheckedRecord:
    """A valid record, with its image bytes already read (so a writer need not read twice)."""
    file: str
    index: int
    record: dict
    images: list[str]
    label: Optional[int]
    label_source: Optional[str]
    image_bytes: list[bytes] = field(default_factory=list, repr=False)  # only with keep_bytes

    @property
    def id(self) -> str:
        return self.record["id"]


def load_records(url: str, endpoint_url: Optional[str] = None) -> tuple[list[Any], bytes]:
    """Read a record file; return (records, raw bytes). Raises RecordFileError naming the file."""
    try:
        raw = storage.read_bytes(url, endpoint_url)
    except (OSError, ValueError) as e:
        raise RecordFileError(f"{url}: cannot read record file: {e}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordFileError(f"{url}: malformed JSON: {e}") from e
    if not isinstance(data, list):
        raise RecordFileError(f"{url}: expected a JSON list of records, got {type(data).__name__}")
    return data, raw


def image_list(record: dict) -> list[str]:
    """The record's image paths: [] for text-only, [path] for one image, the list for multi-view."""
    img = record.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def _parse_label_value(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _NORMAL_WORDS:
            return 0
        if word in _ANOMALOUS_WORDS:
            return 1
    raise ValueError(f"unrecognised label value {value!r}")


def explicit_label(record: dict) -> Optional[int]:
    """Label from an explicit field (None when no such field); ValueError on a bad value."""
    for key in LABEL_KEYS:
        if key in record and record[key] is not None:
            try:
                return _parse_label_value(record[key])
            except ValueError as e:
                raise ValueError(f"field {key!r}: {e}") from None
    return None


def folder_label(path: str) -> Optional[int]:
    """Label of one image path from folder conventions (MVTec ``good`` / ``test/<defect>``, VisA)."""
    dirs = [p.lower() for p in path.replace("\\", "/").split("/")[:-1]]
    if "ground_truth" in dirs:  # a mask, not an image
        return None
    if any(d in _NORMAL_DIRS for d in dirs):
        return 0
    if any(d in _ANOMALOUS_DIRS for d in dirs):
        return 1
    if "test" in dirs and dirs.index("test") + 1 < len(dirs):
        return 1  # MVTec: test/<defect>/xxx.png with <defect> != good
    return None


def record_folder_label(images: list[str]) -> Optional[int]:
    labels = [folder_label(p) for p in images]
    if not labels or any(lab is None for lab in labels):
        return None
    return max(labels)


def qa_label(conversations: list[dict]) -> Optional[int]:
    """Label from the answer to a Yes/No detection question anywhere in the conversation."""
    for i in range(len(conversations) - 1):
        turn, reply = conversations[i], conversations[i + 1]
        if turn.get("from") != "human" or reply.get("from") != "gpt":
            continue
        if not _DETECTION_QUESTION.search(str(turn.get("value", ""))):
            continue
        words = re.findall(r"[a-z]+", str(reply.get("value", "")).lower())
        if words and words[0] in ("yes", "no"):
            return 1 if words[0] == "yes" else 0
    return None


def derive_label(record: dict) -> tuple[Optional[int], Optional[str]]:
    """(label, how): how is "explicit", "folder", "qa" or None (see the module docstring)."""
    label = explicit_label(record)
    if label is not None:
        return label, "explicit"
    label = record_folder_label(image_list(record))
    if label is not None:
        return label, "folder"
    label = qa_label(record.get("conversations") or [])
    if label is not None:
        return label, "qa"
    return None, None


def _conversation_problems(record: dict, n_images: int) -> list[str]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["'conversations' must be a non-empty list"]
    problems = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            problems.append(f"turn {t} is not an object")
            continue
        expected = "human" if t % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            problems.append(f"turn {t} is from {turn.get('from')!r}, expected {expected!r} "
                            "(roles must alternate human/gpt, starting with human)")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            problems.append(f"turn {t} has an empty or non-string 'value'")
    if len(conv) % 2:
        problems.append("the conversation ends with a human turn (no gpt answer to learn)")
    n_tokens = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conv if isinstance(t, dict))
    if n_tokens != n_images:
        problems.append(f"{n_tokens} {IMAGE_TOKEN} token(s) for {n_images} image(s)")
    return problems


def _image_problems(images: list[str], image_root: str, out: Optional[list[bytes]],
                    endpoint_url: Optional[str]) -> list[str]:
    problems = []
    for path in images:
        try:
            url = storage.join_url(image_root, path)
        except ValueError:
            problems.append(f"image path {path!r} is absolute or leaves the image root")
            continue
        if "." not in path.rsplit("/", 1)[-1]:
            problems.append(f"image {path!r} has no file extension")
            continue
        try:
            data = storage.read_bytes(url, endpoint_url)
        except FileNotFoundError:
            problems.append(f"missing image file {url}")
            continue
        except OSError as e:
            problems.append(f"cannot read image file {url}: {e}")
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a full decode: catches truncated files that verify() lets through
        except Exception as e:  # PIL raises many types for corrupt data
            problems.append(f"unreadable image {url}: {type(e).__name__}: {e}")
            continue
        if out is not None:
            out.append(data)
    return problems


def check_record(record: Any, index: int, file: str, image_root: str, read_images: bool = True,
                 keep_bytes: bool = False, endpoint_url: Optional[str] = None) -> CheckedRecord | list[RecordError]:
    """Validate one record; a CheckedRecord when fine, else one RecordError per problem.

    With ``read_images`` every image is read and fully decoded; ``keep_bytes`` keeps the bytes on
    the result (off by default: a whole data set of images must not sit in memory).
    """
    if not isinstance(record, dict):
        return [RecordError(file, index, None, f"record is a {type(record).__name__}, not an object")]
    rid = record.get("id")
    problems: list[str] = []
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        problems.append("missing or invalid 'id'")
        rid = None
    img = record.get("image")
    if img is not None and not (isinstance(img, str) or (isinstance(img, list) and img
                                                           and all(isinstance(p, str) for p in img))):
        problems.append("'image' must be a path or a non-empty list of paths")
        images: list[str] = []
    else:
        images = image_list(record)
    problems += _conversation_problems(record, len(images))
    label, how = None, None
    try:
        label, how = derive_label(record)
    except ValueError as e:
        problems.append(str(e))
    data: list[bytes] = []
    if read_images:
        problems += _image_problems(images, image_root, data if keep_bytes else None, endpoint_url)
    if problems:
        return [RecordError(file, index, None if rid is None else str(rid), p) for p in problems]
    clean = dict(record, id=str(rid))
    return CheckedRecord(file, index, clean, images, label, how, data)


@dataclass
class FileCheck:
    """Result of validating one record file."""
    url: str
    valid: list[CheckedRecord]
    errors: list[RecordError]
    n_records: int
    sha256: str  # of the file's bytes, for the manifest's provenance

    @property
    def invalid_indices(self) -> list[int]:
        return sorted({e.index for e in self.errors})


def check_file(url: str, image_root: Optional[str] = None, read_images: bool = True,
               endpoint_url: Optional[str] = None) -> FileCheck:
    """Validate every record of a file (images relative to ``image_root``, default its folder).

    Raises RecordFileError for a file-level problem.
    """
    records, raw = load_records(url, endpoint_url)
    root = image_root if image_root is not None else storage.dirname_url(url)
    good: list[CheckedRecord] = []
    errors: list[RecordError] = []
    for i, rec in enumerate(records):
        result = check_record(rec, i, url, root, read_images, endpoint_url=endpoint_url)
        if isinstance(result, CheckedRecord):
            good.append(result)
        else:
            errors.extend(result)
    return FileCheck(url, good, errors, len(records), hashlib.sha256(raw).hexdigest())
