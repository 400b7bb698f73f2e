"""Results table next to the published VisA-D&R detection rows (Xu et al., CVPR 2025)."""
from __future__ import annotations

from typing import Any, Optional

# Accuracy / precision / recall / F1, per class then averaged over the 10 VisA classes.
PUBLISHED_DETECTION: dict[str, tuple[float, float, float, float]] = {
    "GPT-4o": (0.70, 0.83, 0.71, 0.68),
    "LLaVA-OV-7B": (0.71, 0.95, 0.56, 0.63),
    "Anomaly-OV-0.5B": (0.79, 0.86, 0.83, 0.82),
    "Anomaly-OV-7B": (0.79, 0.83, 0.86, 0.83),
}


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def detection_table(metrics: dict[str, Any], label: str = "this checkpoint") -> str:
    cols = ("accuracy", "precision", "recall", "f1")
    det = metrics.get("detection")
    names = [f"{k} (paper)" for k in PUBLISHED_DETECTION]
    classes = [f"  {c}" for c in (det or {}).get("per_class", {})]
    width = max(len(label), len("VisA-D&R detection"), *(len(n) for n in names + classes)) + 2
    lines = [f"{'VisA-D&R detection':<{width}} {'Acc':>6} {'Prec':>6} {'Rec':>6} {'F1':>6} {'AUROC':>6}"]
    lines.append("-" * len(lines[0]))
    for name, row in PUBLISHED_DETECTION.items():
        lines.append(f"{name + ' (paper)':<{width}} " + " ".join(f"{v:>6.2f}" for v in row) + f" {'-':>6}")
    if det:
        cm = det["class_mean"]
        lines.append(f"{label:<{width}} " + " ".join(f"{_fmt(cm[c]):>6}" for c in cols)
                     + f" {_fmt(cm.get('auroc')):>6}")
        ov = det["overall"]
        lines.append(f"{'  (pooled, n=' + str(ov['n']) + ')':<{width}} "
                     + " ".join(f"{_fmt(ov[c]):>6}" for c in cols) + f" {_fmt(ov.get('auroc')):>6}")
        lines.append("per class:")
        for c, m in det["per_class"].items():
            lines.append(f"{'  ' + c:<{width}} " + " ".join(f"{_fmt(m[k]):>6}" for k in cols)
                         + f" {_fmt(m.get('auroc')):>6}")
    return "\n".join(lines)


def reasoning_table(metrics: dict[str, Any]) -> str:
    rea = metrics.get("reasoning")
    if not rea:
        return ""
    lines = [f"{'VisA-D&R reasoning':<20} {'n':>5} {'ROUGE-L':>8} {'SBERT':>7} {'GPT-Score':>10}"]
    lines.append("-" * len(lines[0]))
    for kind, g in rea.items():
        gpt = g.get("gpt_score") if "gpt_score" in g else None
        gpt_txt = _fmt(gpt, 2) if "gpt_score" in g else "skipped"
        lines.append(f"{kind:<20} {g['n']:>5} {_fmt(g['rouge_l']):>8} {_fmt(g['sbert']):>7} {gpt_txt:>10}")
    return "\n".join(lines)


def render(metrics: dict[str, Any], label: str = "this checkpoint", notes: Optional[list[str]] = None) -> str:
    parts = [detection_table(metrics, label), reasoning_table(metrics)]
    parts += [f"note: {n}" for n in notes or []]
    return "\n\n".join(p for p in parts if p)
