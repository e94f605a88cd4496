"""The analytic detector: read Shapes-style objects (colour, shape, size, box) out of any RGB image.

No pretrained detector can be downloaded here, and none is needed: the Shapes world is closed, so
objects are found from colour and geometry alone. The steps, and why:

1. Colour in CIELab, nearest class centre (`vocab.COLORS`). Only "core" pixels, close to a class
   centre, seed objects: anti-aliased edges are blends of an object with the background or with
   another object (red + yellow blends look orange), and they must not become objects.
2. Connected components of core pixels per colour; thin or tiny components (blend seams) are
   dropped by a thickness test (maximum of the distance transform) relative to the image width.
3. The surviving labels grow into the remaining foreground (`skimage.segmentation.expand_labels`),
   and every pixel near an object gets a soft membership alpha: its colour projected on the segment
   between the local background colour and the object's colour (rendering and blur both mix
   linearly in sRGB, so this recovers sub-pixel coverage even on blurry samples).
4. Shape by geometry: each of the five shape templates (`geometry.polygon`, circumradius = size
   radius) is fitted to the alpha map (centre, radius, rotation) and the best fit wins. Pixels owned
   by neighbouring objects cost only a little to cover, so an object up to 15% hidden behind another
   still fits its own shape (plain solidity/vertex-count rules confuse a bitten square with a
   cross). The classic features (vertex count, circularity, solidity, extent, enclosing-circle
   fill) are reported with each detection for diagnosis.
5. Size from the fitted circumradius relative to the image width (between `vocab.SIZE_RADIUS`
   bands); boxes from the fitted polygon (amodal, like `ShapeObject.box()`) in pixels and normalised.

All thresholds are global constants measured on renders (see `mmsynth judge validate`), never per case.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy.optimize import minimize
from skimage.color import rgb2lab
from skimage.segmentation import expand_labels

from mmsynth.data import vocab
from mmsynth.data.geometry import polygon
from mmsynth.errors import InputError

# --- colour: a pixel is "core" when it is this close (CIELab distance) to a class centre. Classes are
# >= 39 apart, shade jitter reaches ~9, sensor-like noise (10/255) adds ~5.
CORE_LAB_DIST = 24.0
# --- core masks are median-filtered with a kernel of 1 + 2 * (width // CORE_MEDIAN_PER_PX) pixels (none
# below 128 px): per-pixel noise makes holes in saturated colours that would thin out the core.
CORE_MEDIAN_PER_PX = 128
# --- a core component must be at least this thick (max distance to its border, fraction of width) and
# this large (fraction of the image area); blend seams between two objects are ~1 px thin.
MIN_CORE_THICKNESS = 0.022
MIN_CORE_AREA = 0.004
# --- growth of core labels into anti-aliased / blurred edges, in pixels (plus a part of the width).
EXPAND_PX = 2.0
EXPAND_FRAC = 0.03
# --- pixels of other objects with at least this alpha are "occluder" pixels during a fit, and covering
# them costs OCCLUDER_COST per unit instead of 1 (an object may be up to 15% hidden by others).
OCCLUDER_ALPHA = 0.25
OCCLUDER_COST = 0.15
# --- fitting happens on a crop rescaled so that the object's radius is FIT_RADIUS_PX pixels.
FIT_RADIUS_PX = 10.0
FIT_SUPERSAMPLE = 4
# --- a fitted circumradius below MIN_RADIUS (fraction of width; the small band starts at 0.11) costs
# RADIUS_PENALTY x the relative shortfall.
MIN_RADIUS = 0.10
RADIUS_PENALTY = 1.0
# --- small/large split of the circumradius (fraction of width), midway between the two bands.
SIZE_SPLIT = (max(vocab.SIZE_RADIUS["small"]) + min(vocab.SIZE_RADIUS["large"])) / 2.0
# --- rotational symmetry period of each shape in degrees (a fit searches one period).
SYMMETRY_DEG: dict[str, float] = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}
ROTATION_GRID_DEG = 6.0
NM_MAXFEV = 120
# --- objects touching another object may be hidden in part: extra starts shifted by this fraction of
# the radius in 8 directions and grown by OCCLUDED_GROWTH; the best OCCLUDED_REFINE are refined.
OCCLUDED_SHIFT = 0.35
OCCLUDED_GROWTH = 1.2
OCCLUDED_REFINE = 3

_CLASS_LAB = rgb2lab(np.array([vocab.COLORS[c] for c in vocab.COLOR_NAMES], np.float64)[None] / 255.0)[0]


@dataclass
class Detection:
    """One object read from an image. Boxes are amodal (the fitted full shape), xyxy."""

    color: str
    shape: str
    size: str
    box: tuple[float, float, float, float]  # pixels
    box_norm: tuple[float, float, float, float]  # fractions of width / height
    center: tuple[float, float]  # normalised box centre (the reference point of relations)
    radius: float  # fitted circumradius, fraction of the image width
    rotation: float  # degrees, within the shape's symmetry period
    score: float  # soft IoU of the best template fit on the visible pixels (0..1): a confidence
    color_distance: float  # CIELab distance of the object's median colour to its class centre
    area: int  # visible pixels (alpha >= 0.5)
    shape_losses: dict[str, float] = field(default_factory=dict)  # fit loss per shape (lower is better)
    features: dict[str, float] = field(default_factory=dict)  # classic geometric features, for diagnosis

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("box", "box_norm", "center"):
            d[k] = [round(float(v), 4) for v in d[k]]
        for k in ("radius", "rotation", "score", "color_distance"):
            d[k] = round(float(d[k]), 4)
        d["shape_losses"] = {k: round(float(v), 4) for k, v in d["shape_losses"].items()}
        d["features"] = {k: round(float(v), 4) for k, v in d["features"].items()}
        return d


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image: expected an HxWx3 uint8 RGB array (use mmsynth.io.load_image), got {got}")
    if min(image.shape[:2]) < 16:
        raise InputError(f"image: sides must be at least 16 pixels, got {image.shape[1]}x{image.shape[0]}")
    return image


def _core_labels(lab: np.ndarray, width: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Label map of confident core components (1..K), the colour class of each, and the distance map."""
    d = np.linalg.norm(lab[:, :, None, :] - _CLASS_LAB[None, None], axis=-1)
    nearest = d.argmin(axis=-1)
    dmin = d.min(axis=-1)
    core = dmin <= CORE_LAB_DIST
    labels = np.zeros(core.shape, np.int32)
    classes: list[int] = []
    min_thick = MIN_CORE_THICKNESS * width
    min_area = MIN_CORE_AREA * core.size
    k_median = 1 + 2 * (width // CORE_MEDIAN_PER_PX)
    for c in np.unique(nearest[core]):
        m = (core & (nearest == c)).astype(np.uint8)
        if k_median > 1:  # sensor-like noise punches holes into saturated colours (blue) at high resolution
            m = cv2.medianBlur(m * 255, min(k_median, 255)) // 255
        n, comp, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n <= 1:
            continue
        dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
        thick = np.zeros(n)
        np.maximum.at(thick, comp.ravel(), dist.ravel())
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] >= min_area and thick[k] >= min_thick:
                classes.append(int(c))
                labels[comp == k] = len(classes)
    return labels, classes, dmin


def _background_rgb(rgb: np.ndarray, bg_mask: np.ndarray, width: int) -> np.ndarray:
    """Local background colour everywhere: normalised Gaussian convolution of the background pixels."""
    if bg_mask.sum() < 4:
        return np.full_like(rgb, 255.0)  # no background visible: assume white
    sigma = max(2.0, 0.08 * width)
    w = cv2.GaussianBlur(bg_mask.astype(np.float32), (0, 0), sigma)
    num = cv2.GaussianBlur(rgb * bg_mask[..., None].astype(np.float32), (0, 0), sigma)
    out = num / np.maximum(w, 1e-6)[..., None]
    far = w < 1e-3  # no background nearby: fall back to the global median background
    if far.any():
        out[far] = np.median(rgb[bg_mask], axis=0)
    return out


def _render_template(shape: str, params: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage (float32, grid h x w) of `shape` at (cx, cy, r, rot) in crop pixels."""
    cx, cy, r, rot = (float(v) for v in params)
    h, w = grid
    s = FIT_SUPERSAMPLE
    mask = np.zeros((h * s, w * s), np.uint8)
    pts = np.round(polygon(shape, cx, cy, max(r, 0.5), rot) * s * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_8, shift=4)
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _fit_loss(t: np.ndarray, obs: np.ndarray, other: np.ndarray, norm: float) -> float:
    """L1 between template and observed alpha; covering an occluder's pixels costs OCCLUDER_COST."""
    err = np.where(other, OCCLUDER_COST * t, np.abs(t - obs))
    return float(err.sum()) / norm


def _radius_penalty(r: float, r_min: float) -> float:
    """Shapes objects are never smaller than the small band: a fit that shrinks below it (a blurred star
    read as the small circle inside it) pays for the shortfall."""
    return RADIUS_PENALTY * max(0.0, r_min - r) / r_min


def _nelder_mead(
    shape: str, obs: np.ndarray, other: np.ndarray, x0: np.ndarray, norm: float, r_min: float
) -> tuple[float, np.ndarray]:
    period = SYMMETRY_DEG[shape]
    if period == 0:  # rotation does not matter for a circle: optimise (cx, cy, r)

        def f3(p: np.ndarray) -> float:
            t = _render_template(shape, np.array([*p, 0.0]), obs.shape)
            return _fit_loss(t, obs, other, norm) + _radius_penalty(p[2], r_min)

        simplex = x0[:3] + np.vstack([np.zeros(3), np.eye(3)])
        opts = {"initial_simplex": simplex, "maxfev": NM_MAXFEV, "xatol": 0.05, "fatol": 1e-4}
        res = minimize(f3, x0[:3], method="Nelder-Mead", options=opts)
        return float(res.fun), np.array([*res.x, 0.0])

    def f(p: np.ndarray) -> float:
        return _fit_loss(_render_template(shape, p, obs.shape), obs, other, norm) + _radius_penalty(p[2], r_min)

    simplex = x0 + np.vstack([np.zeros(4), np.diag([1.0, 1.0, 1.0, 4.0])])
    res = minimize(f, x0, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "maxfev": NM_MAXFEV, "xatol": 0.05, "fatol": 1e-4})  # fmt: skip
    p = res.x.copy()
    p[3] = (p[3] + period / 2) % period - period / 2
    return float(res.fun), p


def _fit_shape(
    shape: str, obs: np.ndarray, other: np.ndarray, init: tuple[float, float, float], occluded: bool, r_min: float
) -> tuple[float, np.ndarray]:
    """Best (loss, [cx, cy, r, rot]) of one shape template: coarse search, then Nelder-Mead refinement.

    An unoccluded object's enclosing circle is its circumcircle, so one start suffices; a partly hidden
    object's is not, so starts around it (shifted, larger) are tried and the best few refined.
    """
    norm = max(float(obs.sum()), 1.0)
    cx, cy, r = init
    period = SYMMETRY_DEG[shape]
    step = ROTATION_GRID_DEG if not occluded else 2 * ROTATION_GRID_DEG
    rots = [0.0] if period == 0 else list(np.arange(-period / 2, period / 2, step))
    starts = [(cx, cy, r)]
    if occluded:
        offsets = [(0.0, 0.0)] + [(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4]
        starts = [(cx + OCCLUDED_SHIFT * r * dx, cy + OCCLUDED_SHIFT * r * dy, r * g)
                  for dx, dy in offsets for g in (1.0, OCCLUDED_GROWTH)]  # fmt: skip
    cands = sorted(
        (_fit_loss(_render_template(shape, np.array([*st, a]), obs.shape), obs, other, norm)
         + _radius_penalty(st[2], r_min), i, a)
        for i, st in enumerate(starts)
        for a in rots
    )
    n_refine = OCCLUDED_REFINE if occluded else 1
    fits = [_nelder_mead(shape, obs, other, np.array([*starts[i], a]), norm, r_min) for _, i, a in cands[:n_refine]]
    return min(fits, key=lambda x: x[0])


def _features(mask: np.ndarray) -> dict[str, float]:
    """Classic shape features of a binary mask (reported for diagnosis, not used for the decision)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return {}
    c = max(contours, key=cv2.contourArea)
    area = float(cv2.contourArea(c))
    perim = float(cv2.arcLength(c, True))
    hull = float(cv2.contourArea(cv2.convexHull(c)))
    (_, _), rad = cv2.minEnclosingCircle(c)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    _, _, w, h = cv2.boundingRect(c)
    approx = cv2.approxPolyDP(c, 0.04 * perim, True)
    return {
        "vertices": float(len(approx)),
        "circularity": 4 * math.pi * area / max(perim**2, 1e-6),
        "solidity": area / max(hull, 1e-6),
        "extent": area / max(w * h, 1e-6),
        "rect_fill": area / max(rw * rh, 1e-6),
        "circle_fill": area / max(math.pi * rad**2, 1e-6),
    }


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Every Shapes-style object in `image` (HxWx3 uint8 RGB, any size from 16 px), back-to-front unknown.

    Detections are ordered by position (top to bottom, then left to right) so output is stable.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    rgb = img.astype(np.float32)
    lab = rgb2lab(img)
    core, classes, _ = _core_labels(lab, w)
    if not classes:
        return []
    labels = expand_labels(core, distance=EXPAND_PX + EXPAND_FRAC * w)
    bg = _background_rgb(rgb, labels == 0, w)
    alpha = np.zeros((h, w), np.float32)
    obj_rgb = []
    for k in range(1, len(classes) + 1):
        c = np.median(rgb[core == k], axis=0)
        obj_rgb.append(c)
        m = labels == k
        diff = c[None] - bg[m]
        a = ((rgb[m] - bg[m]) * diff).sum(-1) / np.maximum((diff**2).sum(-1), 1.0)
        alpha[m] = np.clip(a, 0.0, 1.0)
    occupied = (labels > 0) & (alpha >= OCCLUDER_ALPHA)
    out = []
    for k in range(1, len(classes) + 1):
        det = _detect_one(k, classes[k - 1], obj_rgb[k - 1], labels, alpha, occupied, (h, w))
        if det is not None:
            out.append(det)
    out.sort(key=lambda d: (round(d.center[1], 2), d.center[0]))
    return out


def _detect_one(
    k: int, cls: int, rgb: np.ndarray, labels: np.ndarray, alpha: np.ndarray, occupied: np.ndarray, hw: tuple[int, int]
) -> Detection | None:
    h, w = hw
    own = labels == k
    vis = own & (alpha >= 0.5)
    if vis.sum() < 3:
        return None
    ys, xs = np.nonzero(own)
    pad = 2
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
    pts = np.stack(np.nonzero(vis)[::-1], axis=1).astype(np.float32)
    (mcx, mcy), mr = cv2.minEnclosingCircle(pts)
    mr = max(mr + 0.5, 1.0)  # pixel centres to pixel extent
    s = FIT_RADIUS_PX / mr
    gw, gh = max(int(round((x1 - x0) * s)), 4), max(int(round((y1 - y0) * s)), 4)
    sx, sy = gw / (x1 - x0), gh / (y1 - y0)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    obs_full = np.where(own, alpha, 0.0).astype(np.float32)[y0:y1, x0:x1]
    obs = cv2.resize(obs_full, (gw, gh), interpolation=interp)
    other_full = (occupied & ~own)[y0:y1, x0:x1].astype(np.float32)
    other = cv2.resize(other_full, (gw, gh), interpolation=interp) >= 0.5
    # crop coordinates: continuous pixel coordinate X maps to (X - x0) * sx (pixel i spans [i, i+1))
    init = ((mcx + 0.5 - x0) * sx, (mcy + 0.5 - y0) * sy, mr * (sx + sy) / 2)
    occluded = bool((cv2.dilate((obs > OCCLUDER_ALPHA).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)[other].any())
    r_min = MIN_RADIUS * w * (sx + sy) / 2  # in crop pixels
    fits = {shape: _fit_shape(shape, obs, other, init, occluded, r_min) for shape in vocab.SHAPES}
    shape = min(fits, key=lambda s_: fits[s_][0])
    cx, cy, r, rot = fits[shape][1]
    t = _render_template(shape, fits[shape][1], obs.shape)
    valid = ~other
    score = float(np.minimum(t, obs)[valid].sum() / max(np.maximum(t, obs)[valid].sum(), 1e-6))
    # back to image coordinates
    pcx, pcy, pr = cx / sx + x0, cy / sy + y0, r / ((sx + sy) / 2)
    poly = polygon(shape, pcx, pcy, pr, rot)
    bx0, by0 = np.clip(poly.min(axis=0), 0, [w, h])
    bx1, by1 = np.clip(poly.max(axis=0), 0, [w, h])
    radius = pr / w
    lab = rgb2lab(rgb[None, None] / 255.0)[0, 0]
    cdist = np.linalg.norm(_CLASS_LAB - lab, axis=1)
    box_norm = (bx0 / w, by0 / h, bx1 / w, by1 / h)
    return Detection(
        color=vocab.COLOR_NAMES[cls],
        shape=shape,
        size="small" if radius < SIZE_SPLIT else "large",
        box=(float(bx0), float(by0), float(bx1), float(by1)),
        box_norm=tuple(float(v) for v in box_norm),  # type: ignore[arg-type]
        center=((box_norm[0] + box_norm[2]) / 2, (box_norm[1] + box_norm[3]) / 2),
        radius=float(radius),
        rotation=float(rot),
        score=score,
        color_distance=float(cdist[cls]),
        area=int(vis.sum()),
        shape_losses={s_: fits[s_][0] for s_ in vocab.SHAPES},
        features=_features(cv2.resize(vis[y0:y1, x0:x1].astype(np.uint8), (gw, gh), interpolation=cv2.INTER_NEAREST)),
    )
