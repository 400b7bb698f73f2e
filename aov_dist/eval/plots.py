"""Evaluation pictures as PNG bytes: expert ROC curve, detection confusion matrix, anomaly maps.

Pure functions (data in, PNG bytes out). Figures are built on ``matplotlib.figure.Figure`` with the
Agg canvas directly, never through pyplot: no global state, no GUI backend, safe in threads and in
Ray workers. Every figure has a fixed pixel size (no ``bbox_inches="tight"``), so callers and tests
know exactly what they get.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

DPI = 100
ROC_PX = 500
CM_PANEL_PX = 300
CM_MAX_COLS = 4
# Anomaly-map grid layout, in pixels (overlay_panel_box turns it into boxes).
MAP_PANEL_PX = 256
MAP_CAPTION_PX = 44
MAP_PAD_PX = 12
MAP_TITLE_PX = 36
MAP_COLORBAR_PX = 80
MAP_MAX_COLS = 3
MAP_CMAP = "jet"


def _figure(width_px: int, height_px: int, layout: Optional[str] = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A layout engine moves axes inside the figure; it never changes the figure's pixel size.
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ---------------------------------------------------------------- ROC

def roc_curve_png(y_true: Sequence[bool], scores: Sequence[float], title: str = "Expert image scores") -> bytes:
    """ROC curve of ``scores`` against ``y_true`` (1 = anomalous), AUROC in the title; ROC_PX square.

    Raises ValueError when the curve is undefined (fewer than two labels, or a missing score).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    t = np.asarray(y_true, dtype=bool)
    if len(scores) != t.size or any(s is None for s in scores):
        raise ValueError(f"roc_curve_png: need one score per label, got {len(scores)} scores "
                         f"(missing: {sum(s is None for s in scores)}) for {t.size} labels")
    if t.all() or not t.any():
        raise ValueError(f"roc_curve_png: ROC is undefined with only one label present (n={t.size})")
    s = np.asarray(scores, dtype=float)
    fpr, tpr, _ = roc_curve(t, s)
    auc = float(roc_auc_score(t, s))
    fig = _figure(ROC_PX, ROC_PX)
    ax = fig.add_axes((0.14, 0.12, 0.8, 0.76))
    ax.plot(fpr, tpr, color="tab:red", lw=2, drawstyle="steps-post", label=f"expert (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title(f"{title}\nAUROC = {auc:.3f}  (n={t.size}, anomalous={int(t.sum())})")
    return _png(fig)


# ---------------------------------------------------------------- confusion matrix

def confusion_counts(y_true: Sequence[bool], y_pred: Sequence[bool]) -> np.ndarray:
    """[[TN, FP], [FN, TP]]: rows = truth (normal, anomalous), columns = answer (No, Yes)."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"confusion_counts: {t.size} labels but {p.size} predictions")
    return np.array([[np.sum(~t & ~p), np.sum(~t & p)], [np.sum(t & ~p), np.sum(t & p)]], dtype=int)


def confusion_grid_shape(num_classes: int) -> tuple[int, int]:
    """(rows, cols) of panels: 'all' first, then one per class."""
    panels = 1 + num_classes
    cols = min(CM_MAX_COLS, panels)
    return math.ceil(panels / cols), cols


def _cm_panel(ax, counts: np.ndarray, title: str) -> None:
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, int(counts.max())))
    for (r, c), n in np.ndenumerate(counts):
        ax.text(c, r, str(int(n)), ha="center", va="center", fontsize=14,
                color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks([0, 1], ["No", "Yes"])
    ax.set_yticks([0, 1], ["normal", "anomalous"])
    ax.set_xlabel("answer")
    ax.set_title(title, fontsize=10)


def confusion_matrix_png(y_true: Sequence[bool], y_pred: Sequence[bool],
                         classes: Optional[Sequence[str]] = None) -> bytes:
    """Confusion matrix of the detection answers with counts: all images, then one panel per class
    when ``classes`` (one per sample) is given. Size: cols * CM_PANEL_PX x rows * CM_PANEL_PX."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    names = sorted(set(classes)) if classes is not None else []
    if classes is not None and len(classes) != t.size:
        raise ValueError(f"confusion_matrix_png: {len(classes)} classes for {t.size} samples")
    rows, cols = confusion_grid_shape(len(names))
    fig = _figure(cols * CM_PANEL_PX, rows * CM_PANEL_PX, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    _cm_panel(axes[0][0], confusion_counts(t, p), f"all (n={t.size})")
    cls = np.asarray(classes) if classes is not None else None
    for k, name in enumerate(names, start=1):
        sel = cls == name
        _cm_panel(axes[k // cols][k % cols], confusion_counts(t[sel], p[sel]), f"{name} (n={int(sel.sum())})")
    for k in range(1 + len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    return _png(fig)


# ---------------------------------------------------------------- anomaly maps

@dataclass
class MapSample:
    """One overlay panel: an image, its expert map (grid x grid, base view) and a caption."""

    image: Image.Image
    amap: np.ndarray
    caption: str


def upsample_map(amap: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a [g, g] map to [size, size] (float32)."""
    m = np.asarray(amap, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"upsample_map: expected a 2-D map, got shape {m.shape}")
    return np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.BILINEAR))


def overlay_rgb(image: Image.Image, amap: np.ndarray, vmin: float, vmax: float,
                size: int = MAP_PANEL_PX, alpha: float = 0.5) -> np.ndarray:
    """[size, size, 3] uint8: the image stretched to a square (as the model's base view sees it)
    blended with the colour-mapped, upsampled map (``alpha`` = weight of the map colour)."""
    from matplotlib import colormaps

    base = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    norm = np.clip((upsample_map(amap, size) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps[MAP_CMAP](norm)[..., :3]
    return np.round(255 * ((1 - alpha) * base + alpha * heat)).astype(np.uint8)


def overlay_grid_shape(n: int) -> tuple[int, int]:
    cols = min(MAP_MAX_COLS, max(1, n))
    return math.ceil(max(1, n) / cols), cols


def overlay_figure_size(n: int) -> tuple[int, int]:
    """(width, height) in pixels of anomaly_maps_png for n panels."""
    rows, cols = overlay_grid_shape(n)
    width = MAP_PAD_PX + cols * (MAP_PANEL_PX + MAP_PAD_PX)
    height = MAP_TITLE_PX + rows * (MAP_CAPTION_PX + MAP_PANEL_PX + MAP_PAD_PX) + MAP_COLORBAR_PX
    return width, height


def overlay_panel_box(k: int, n: int) -> tuple[int, int, int]:
    """(left, top, side) in pixels of panel k's picture in the PNG of n panels (row-major)."""
    _, cols = overlay_grid_shape(n)
    r, c = divmod(k, cols)
    left = MAP_PAD_PX + c * (MAP_PANEL_PX + MAP_PAD_PX)
    top = MAP_TITLE_PX + r * (MAP_CAPTION_PX + MAP_PANEL_PX + MAP_PAD_PX) + MAP_CAPTION_PX
    return left, top, MAP_PANEL_PX


def anomaly_maps_png(samples: Sequence[MapSample], vmin: Optional[float] = None, vmax: Optional[float] = None,
                     alpha: float = 0.5, title: str = "Expert significance maps (base view)") -> bytes:
    """The overlays in a grid of at most MAP_MAX_COLS columns with one shared colour scale (default:
    min..max over all maps, so panels are comparable) and a colour bar. Size: overlay_figure_size."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if not samples:
        raise ValueError("anomaly_maps_png: no samples")
    maps = [np.asarray(s.amap, dtype=np.float32) for s in samples]
    lo = float(min(m.min() for m in maps)) if vmin is None else float(vmin)
    hi = float(max(m.max() for m in maps)) if vmax is None else float(vmax)
    if hi <= lo:  # a flat map: any non-empty range paints it in the colour of its value
        hi = lo + 1e-6
    width, height = overlay_figure_size(len(samples))
    fig = _figure(width, height)
    fig.text(0.5, 1 - (MAP_TITLE_PX / 2) / height, title, ha="center", va="center", fontsize=12)
    for k, (s, m) in enumerate(zip(samples, maps)):
        left, top, side = overlay_panel_box(k, len(samples))
        ax = fig.add_axes((left / width, 1 - (top + side) / height, side / width, side / height))
        ax.imshow(overlay_rgb(s.image, m, lo, hi, side, alpha), interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        fig.text((left + side / 2) / width, 1 - (top - MAP_CAPTION_PX / 2) / height, s.caption,
                 ha="center", va="center", fontsize=9)
    cax = fig.add_axes((0.1, (MAP_COLORBAR_PX * 0.6) / height, 0.8, (MAP_COLORBAR_PX * 0.2) / height))
    bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), colormaps[MAP_CMAP]), cax=cax, orientation="horizontal")
    bar.ax.tick_params(labelsize=8)
    bar.set_label("significance m (shared scale)", fontsize=8)
    return _png(fig)
