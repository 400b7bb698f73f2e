"""Results table next to the published VisA-D&R detection rows (Xu et al., CVPR 2025)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

# Accuracy / precision / recall / F1, per class then averaged over the 10 VisA classes.
PUBLISHED_DETECTION: dict[str, tuple[float, float, float, float]] = {
    "GPT-4o": (0.70, 0.83, 0.71, 0.68),
    "LLaVA-OV-7B": (0.71, 0.95, 0.56, 0.63),
    "Anomaly-OV-0.5B": (0.79, 0.86, 0.83, 0.82),
    "Anomaly-OV-7B": (0.79, 0.83, 0.86, 0.83),
}


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def text_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], width: int = 100) -> str:
    """A plain-text table (rich, no colours): first column left-aligned, the others right."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(table)
    return out.getvalue().rstrip()


def detection_table(metrics: dict[str, Any], label: str = "this checkpoint") -> str:
    cols = ("accuracy", "precision", "recall", "f1")
    det = metrics.get("detection")
    rows = [[f"{name} (paper)", *(f"{v:.2f}" for v in row), "-"] for name, row in PUBLISHED_DETECTION.items()]
    if det:
        cm, ov = det["class_mean"], det["overall"]
        rows.append([label, *(_fmt(cm[c]) for c in cols), _fmt(cm.get("auroc"))])
        rows.append([f"  (pooled, n={ov['n']})", *(_fmt(ov[c]) for c in cols), _fmt(ov.get("auroc"))])
        rows += [[f"  {c}", *(_fmt(m[k]) for k in cols), _fmt(m.get("auroc"))] for c, m in det["per_class"].items()]
    return text_table("VisA-D&R detection (class means; per class below ours)",
                      ["model", "Acc", "Prec", "Rec", "F1", "AUROC"], rows)


def reasoning_table(metrics: dict[str, Any]) -> str:
    rea = metrics.get("reasoning")
    if not rea:
        return ""
    rows = [[kind, str(g["n"]), _fmt(g["rouge_l"]), _fmt(g["sbert"]),
             _fmt(g.get("gpt_score"), 2) if "gpt_score" in g else "skipped"] for kind, g in rea.items()]
    return text_table("VisA-D&R reasoning", ["questions", "n", "ROUGE-L", "SBERT", "GPT-Score"], rows)


def render(metrics: dict[str, Any], label: str = "this checkpoint", notes: Optional[list[str]] = None) -> str:
    parts = [detection_table(metrics, label), reasoning_table(metrics)]
    parts += [f"note: {n}" for n in notes or []]
    return "\n\n".join(p for p in parts if p)
