"""Procedural "industrial" images with planted defects and their pixel masks (numpy only).

Six object/texture classes (``CLASSES``) are drawn on a float RGB canvas from a per-object *style*
(colours, pattern frequencies: sampled once per object, so several views show the same object)
and a per-view *pose* (centre, rotation, scale). A defect (``DEFECTS``) is then painted only
inside its mask, which is always restricted to the object's pixels:

    image == clean outside the mask, and differs strongly inside it (contrasting colours),

so labels, masks and pixels are consistent by construction and the tests can check it. Defects
vary in kind, position and size but are kept clearly visible at small sizes (>= ~1.5 % of the
image area, or a >= 2.5 px wide line) because a tiny demo model must learn detection from them.
Everything is vectorised over the pixel grid: a 112 px image costs about a millisecond.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

CLASSES = ("screw", "bottle", "pcb", "tile", "fabric", "metal_plate")
DEFECTS = ("scratch", "hole", "crack", "stain", "missing_part", "color_change")

# Rows/columns of a 3x3 grid laid over the object's bounding box, named for "a scratch in the
# upper left of the screw".
LOCATIONS = (("upper left", "top", "upper right"), ("left", "center", "right"),
              ("lower left", "bottom", "lower right"))


@dataclass
class SynthImage:
    image: np.ndarray  # uint8 [S, S, 3]
    clean: np.ndarray  # uint8 [S, S, 3]: the same view before the defect was painted
    mask: np.ndarray  # bool [S, S]: True on defect pixels (all False for a normal image)
    cls: str
    defect: Optional[str]
    location: Optional[str]  # e.g. "upper left" (of the object); None for a normal image
    shade: Optional[str]  # "darker" / "brighter" than the clean surface under it; None when normal


@dataclass
class Canvas:
    """One rendered view: image, where the object is, and what lies 'behind' it."""
    img: np.ndarray  # float32 [S, S, 3] in [0, 1]
    obj: np.ndarray  # bool [S, S]: pixels a defect may touch
    backing: np.ndarray  # float32 [S, S, 3]: what a missing part reveals


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")  # yy, xx in [0, 1]


def _rotated(yy: np.ndarray, xx: np.ndarray, pose: dict) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates (u along the object's axis, v across it), scaled by the pose."""
    dy, dx = yy - pose["cy"], xx - pose["cx"]
    c, s = math.cos(pose["theta"]), math.sin(pose["theta"])
    return (dx * c + dy * s) / pose["scale"], (-dx * s + dy * c) / pose["scale"]


def _lum(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _jitter(rng: np.random.Generator, base: tuple[float, float, float], amount: float = 0.08) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _frame(size: int, pose: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image coordinates (yy, xx) and the object's own (u, v) under its pose."""
    yy, xx = _grid(size)
    return (yy, xx, *_rotated(yy, xx, pose))


def _fill(size: int, colour: np.ndarray) -> np.ndarray:
    return np.broadcast_to(colour.astype(np.float32), (size, size, 3)).copy()


def _shade(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, pose: dict) -> np.ndarray:
    """A soft lighting gradient whose direction follows the pose (varies normals, not labels)."""
    g = 1.0 + 0.12 * ((yy - 0.5) * math.cos(pose["theta"] * 2) + (xx - 0.5) * math.sin(pose["theta"] * 2))
    return img * g[..., None]


# ---- classes: each is (style sampler, renderer) -------------------------------------------------
# As in VisA/MVTec, one class is one product: its normal samples share colours and layout (small
# jitter), so "normal" is learnable from ~100 images and a defect stands out from it.

def _style_screw(rng):
    return {"bg": _jitter(rng, (0.82, 0.82, 0.8), 0.08), "metal": _jitter(rng, (0.62, 0.63, 0.66), 0.06),
            "pitch": rng.uniform(38, 60), "length": rng.uniform(0.5, 0.62)}


def _draw_screw(st, pose, size, rng) -> Canvas:
    yy, xx, u, v = _frame(size, pose)
    half = st["length"] / 2
    width = 0.055 * (1 - 0.6 * np.clip((u - half + 0.1) / 0.1, 0, 1))  # tapering tip
    shaft = (np.abs(v) < width) & (u > -half) & (u < half)
    head = ((u + half) ** 2 + v ** 2 < 0.12 ** 2) & (u < -half + 0.04)
    obj = shaft | head
    thread = 0.75 + 0.25 * np.sin(u * st["pitch"] * 2 * math.pi)
    metal = st["metal"][None, None] * np.where(head, 0.9, thread)[..., None]
    bg = _fill(size, st["bg"])
    img = np.where(obj[..., None], metal, bg)
    return Canvas(_shade(img, yy, xx, pose), obj, bg)


def _style_bottle(rng):
    return {"bg": _jitter(rng, (0.1, 0.1, 0.1), 0.05), "glass": _jitter(rng, (0.2, 0.45, 0.25), 0.06),
            "r_out": rng.uniform(0.36, 0.42), "r_in": rng.uniform(0.2, 0.26)}


def _draw_bottle(st, pose, size, rng) -> Canvas:
    yy, xx, u, v = _frame(size, pose)
    r = np.sqrt(u ** 2 + v ** 2)
    obj = r < st["r_out"]
    # Rings of a bottle seen from above: bright lip, darker body, dark neck opening.
    ring = np.where(r < st["r_in"] * 0.55, 0.35, np.where(r < st["r_in"], 1.25, 0.8 + 0.2 * np.cos(r * 40)))
    bg = _fill(size, st["bg"])
    img = np.where(obj[..., None], st["glass"][None, None] * ring[..., None], bg)
    return Canvas(_shade(img, yy, xx, pose), obj, bg)


# Like a VisA PCB subset, every board of the class has the same layout (traces and chips at about
# the same places, one board colour): a normal board must look like the other normal boards, or a
# dark hole is just another chip.
_PCB_TRACES = np.array([-0.18, 0.2, -0.12, 0.16], np.float32)
_PCB_CHIPS = np.array([[-0.15, 0.05], [0.12, -0.12]], np.float32)


def _style_pcb(rng):
    return {"bg": _jitter(rng, (0.7, 0.7, 0.72), 0.1), "board": _jitter(rng, (0.1, 0.45, 0.2), 0.05),
            "copper": _jitter(rng, (0.82, 0.62, 0.3), 0.05),
            "traces": _PCB_TRACES + rng.uniform(-0.02, 0.02, (4,)).astype(np.float32),
            "chips": _PCB_CHIPS + rng.uniform(-0.02, 0.02, (2, 2)).astype(np.float32),
            "half": rng.uniform(0.3, 0.36, 2)}


def _draw_pcb(st, pose, size, rng) -> Canvas:
    yy, xx = _grid(size)
    u, v = _rotated(yy, xx, {**pose, "theta": pose["theta"] * 0.15})  # boards lie almost square
    obj = (np.abs(u) < st["half"][0]) & (np.abs(v) < st["half"][1])
    img = _fill(size, st["bg"])
    img[obj] = st["board"]
    t = st["traces"]
    traces = (np.abs(v - t[0]) < 0.012) | (np.abs(v - t[1]) < 0.012) | (np.abs(u - t[2]) < 0.012) | (np.abs(u - t[3]) < 0.012)
    img[obj & traces] = st["copper"]
    for cu, cv in st["chips"]:
        img[obj & (np.abs(u - cu) < 0.07) & (np.abs(v - cv) < 0.05)] = (0.08, 0.08, 0.09)
    bg = _fill(size, st["bg"])
    return Canvas(_shade(img, yy, xx, pose), obj, bg)


def _style_tile(rng):
    return {"tile": _jitter(rng, (0.72, 0.38, 0.25), 0.05), "grout": _jitter(rng, (0.9, 0.9, 0.88), 0.06),
            "period": rng.uniform(0.22, 0.32), "var": rng.uniform(0.03, 0.08, 64).astype(np.float32)}


def _draw_tile(st, pose, size, rng) -> Canvas:
    yy, xx = _grid(size)
    u, v = _rotated(yy, xx, {**pose, "theta": pose["theta"] * 0.1})
    pu, pv = u / st["period"], v / st["period"]
    grout = (np.abs(pu - np.round(pu)) < 0.05) | (np.abs(pv - np.round(pv)) < 0.05)
    cell = (np.floor(pu).astype(np.int64) * 7 + np.floor(pv).astype(np.int64) * 13) % 64
    img = st["tile"][None, None] * (1 - st["var"][cell])[..., None]
    img = np.where(grout[..., None], st["grout"][None, None], img)
    return Canvas(_shade(img, yy, xx, pose), _inner(size), _fill(size, np.full(3, 0.06, np.float32)))


def _style_fabric(rng):
    return {"colour": _jitter(rng, (0.35, 0.45, 0.65), 0.05), "freq": rng.uniform(14, 22)}


def _draw_fabric(st, pose, size, rng) -> Canvas:
    yy, xx, u, v = _frame(size, pose)
    f = st["freq"] * 2 * math.pi
    weave = 0.8 + 0.2 * np.sin(u * f) * np.sign(np.sin(v * f)) + 0.05 * np.sin(v * f * 2)
    img = st["colour"][None, None] * weave[..., None]
    return Canvas(_shade(img, yy, xx, pose), _inner(size), _fill(size, np.full(3, 0.04, np.float32)))


def _style_metal(rng):
    return {"bg": _jitter(rng, (0.15, 0.16, 0.2), 0.05), "metal": _jitter(rng, (0.66, 0.67, 0.7), 0.07),
            # faint brushing: strong streaks read as scratches to a small model
            "streaks": rng.uniform(0.96, 1.04, 256).astype(np.float32), "half": rng.uniform(0.3, 0.38, 2)}


def _draw_metal(st, pose, size, rng) -> Canvas:
    yy, xx = _grid(size)
    u, v = _rotated(yy, xx, {**pose, "theta": pose["theta"] * 0.3})
    obj = (np.abs(u) < st["half"][0]) & (np.abs(v) < st["half"][1])
    streak = st["streaks"][np.clip(((v + 1) * 128).astype(np.int64), 0, 255)]
    img = np.where(obj[..., None], st["metal"][None, None] * streak[..., None], st["bg"][None, None])
    for su in (-1, 1):  # rivets near the corners
        for sv in (-1, 1):
            r = (u - su * (st["half"][0] - 0.06)) ** 2 + (v - sv * (st["half"][1] - 0.06)) ** 2
            img[r < 0.022 ** 2] = st["metal"] * 0.6
    bg = _fill(size, st["bg"])
    return Canvas(_shade(img, yy, xx, pose), obj, bg)


def _inner(size: int) -> np.ndarray:
    """Textures fill the frame: keep defects off a thin border so they are never cut off."""
    m = np.zeros((size, size), bool)
    b = max(1, size // 12)
    m[b:-b, b:-b] = True
    return m


_RENDERERS: dict[str, tuple[Callable, Callable]] = {
    "screw": (_style_screw, _draw_screw), "bottle": (_style_bottle, _draw_bottle),
    "pcb": (_style_pcb, _draw_pcb), "tile": (_style_tile, _draw_tile),
    "fabric": (_style_fabric, _draw_fabric), "metal_plate": (_style_metal, _draw_metal),
}


# ---- defects: each returns (mask, painted image) given the clean canvas ---------------------------

def _contrast(local: np.ndarray, rng) -> np.ndarray:
    """A colour far in brightness from the local mean, so the defect is always visible."""
    lum = float(_lum(local))
    level = rng.uniform(0.02, 0.12) if lum > 0.42 else rng.uniform(0.85, 0.97)
    return np.clip(np.full(3, level, np.float32) + rng.uniform(-0.04, 0.04, 3).astype(np.float32), 0, 1)


def _seg_dist(yy, xx, p, q) -> np.ndarray:
    d = q - p
    t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return np.hypot(yy - (p[0] + t * d[0]), xx - (p[1] + t * d[1]))


def _polyline(yy, xx, pts, width) -> np.ndarray:
    dist = np.min(np.stack([_seg_dist(yy, xx, pts[i], pts[i + 1]) for i in range(len(pts) - 1)]), axis=0)
    return dist < width / 2


def _blob(yy, xx, centre, radius, rng) -> np.ndarray:
    ang = np.arctan2(yy - centre[0], xx - centre[1])
    k, ph = rng.integers(2, 5), rng.uniform(0, 2 * math.pi)
    r = radius * (1 + 0.25 * np.sin(k * ang + ph))
    return np.hypot((yy - centre[0]) / rng.uniform(0.7, 1.0), xx - centre[1]) < r


def _defect_mask(kind, yy, xx, centre, size, rng) -> np.ndarray:
    px = 1.0 / size
    if kind == "scratch":
        ang, length = rng.uniform(0, math.pi), rng.uniform(0.25, 0.45)
        d = np.array([math.sin(ang), math.cos(ang)]) * length / 2
        bend = rng.uniform(-0.06, 0.06, 2)
        pts = [centre - d, centre + bend, centre + d]
        return _polyline(yy, xx, pts, max(3.5 * px, 0.032))
    if kind == "crack":
        pts, p, ang = [centre], centre.copy(), rng.uniform(0, 2 * math.pi)
        for _ in range(rng.integers(5, 9)):
            ang += rng.uniform(-1.0, 1.0)
            p = p + np.array([math.sin(ang), math.cos(ang)]) * rng.uniform(0.04, 0.07)
            pts.append(p)
        return _polyline(yy, xx, pts, max(3.0 * px, 0.028))
    if kind == "hole":
        return np.hypot(yy - centre[0], xx - centre[1]) < rng.uniform(0.05, 0.085)
    if kind in ("stain", "color_change"):
        return _blob(yy, xx, centre, rng.uniform(0.08, 0.13), rng)
    if kind == "missing_part":
        return _blob(yy, xx, centre, rng.uniform(0.09, 0.14), rng)
    raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECTS}")


def _paint(kind, canvas: Canvas, mask: np.ndarray, rng) -> np.ndarray:
    img = canvas.img.copy()
    local = img[mask].mean(axis=0)
    if kind in ("scratch", "crack", "hole"):
        img[mask] = _contrast(local, rng)
    elif kind == "stain":
        dark = float(_lum(local)) > 0.42
        colour = np.array((0.25, 0.15, 0.05) if dark else (0.95, 0.85, 0.45), np.float32)
        img[mask] = 0.2 * img[mask] + 0.8 * colour
    elif kind == "color_change":
        target = np.clip(1.0 - local[[1, 2, 0]], 0, 1)  # complementary, channel-rotated hue
        if np.abs(target - local).max() < 0.35:
            target = _contrast(local, rng)
        img[mask] = 0.25 * img[mask] + 0.75 * target
    elif kind == "missing_part":
        img[mask] = canvas.backing[mask]
        if np.abs(img[mask] - canvas.img[mask]).mean() < 0.3:  # backing too similar to see: contrast
            img[mask] = _contrast(local, rng)
    return img


def location_of(mask: np.ndarray, obj: np.ndarray) -> str:
    """Cell of the defect's centre in a 3x3 grid over the object's bounding box (as the image shows
    it: rows top to bottom, columns left to right)."""
    ys, xs = np.nonzero(mask)
    oy, ox = np.nonzero(obj)
    row = (ys.mean() - oy.min()) / max(1, oy.max() + 1 - oy.min())
    col = (xs.mean() - ox.min()) / max(1, ox.max() + 1 - ox.min())
    return LOCATIONS[min(2, int(row * 3))][min(2, int(col * 3))]


def shade_of(image: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> str:
    return "darker" if _lum(image[mask].astype(np.float32)).mean() < _lum(clean[mask].astype(np.float32)).mean() \
        else "brighter"


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def sample_pose(rng: np.random.Generator, view: int = 0, views: int = 1) -> dict:
    """Centre, rotation and scale of one view; views of a multi-view object are spread around."""
    base = rng.uniform(0, 2 * math.pi) if views == 1 else view * 2 * math.pi / views + rng.uniform(-0.3, 0.3)
    return {"cy": 0.5 + rng.uniform(-0.06, 0.06), "cx": 0.5 + rng.uniform(-0.06, 0.06),
            "theta": base, "scale": rng.uniform(0.88, 1.08)}


def render_object(rng: np.random.Generator, cls: str, defect: Optional[str], size: int,
                  views: int = 1) -> list[SynthImage]:
    """Render ``views`` views of one object (same style); with a defect, every view has one.

    Every view of an anomalous multi-view object carries a defect of the same kind (at its own
    place) so that the per-image label the expert trains on equals the record's label.
    """
    if cls not in _RENDERERS:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    style_fn, draw_fn = _RENDERERS[cls]
    style = style_fn(rng)
    out = []
    for view in range(views):
        canvas = draw_fn(style, sample_pose(rng, view, views), size, rng)
        noise = rng.normal(0, 0.015, canvas.img.shape).astype(np.float32)
        canvas.img = np.clip(canvas.img + noise, 0, 1)
        clean = _to_uint8(canvas.img)
        if defect is None:
            out.append(SynthImage(clean, clean, np.zeros((size, size), bool), cls, None, None, None))
            continue
        out.append(_plant(rng, canvas, clean, cls, defect, size))
    return out


def _plant(rng, canvas: Canvas, clean: np.ndarray, cls: str, defect: str, size: int) -> SynthImage:
    yy, xx = _grid(size)
    candidates = np.flatnonzero(canvas.obj & _inner(size))
    # Thin objects (a screw) cannot hold a large defect: scale the minimum with the object too.
    min_area = max(6, int(min(0.006 * size * size, 0.04 * canvas.obj.sum())))
    for _ in range(30):  # retry until the defect lands on enough object pixels AND shows
        idx = candidates[rng.integers(len(candidates))]
        centre = np.array([yy.flat[idx], xx.flat[idx]], np.float32)
        mask = _defect_mask(defect, yy, xx, centre, size, rng) & canvas.obj
        if mask.sum() < min_area:
            continue
        image = _to_uint8(_paint(defect, canvas, mask, rng))
        changed = image != clean
        mask &= changed.any(axis=-1)  # a mask pixel the paint left unchanged is not a defect pixel
        if mask.sum() >= min_area:
            image = np.where(mask[..., None], image, clean)
            return SynthImage(image, clean, mask, cls, defect, location_of(mask, canvas.obj),
                              shade_of(image, clean, mask))
    raise RuntimeError(f"could not place a visible {defect} on {cls} at {size} px")
