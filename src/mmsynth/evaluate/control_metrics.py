"""Controllability metrics (ControlNet++ protocol): extract the condition back out of a generated image
and compare it with the condition the model was given.

The metric functions are pure on arrays (they work without any annotator); `controllability` runs the
extraction through `mmsynth.annotate.annotate`, imported lazily so this module loads on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.optimize import linear_sum_assignment
from skimage.color import deltaE_cie76, rgb2lab
from skimage.metrics import structural_similarity

from mmsynth.errors import InputError


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what}: generated and input conditions differ in shape ({a.shape} vs {b.shape})")


def _binary(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m)
    return m > (127 if m.dtype == np.uint8 else 0.5) if m.dtype != bool else m


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: float = 0.0) -> dict[str, float]:
    """Precision, recall and F1 of binary edge maps (uint8 0/255, bool or 0..1 floats).

    A predicted edge pixel is correct when a target edge lies within `tolerance` pixels (Euclidean;
    0 = the same pixel), and vice versa for recall. Two empty maps agree perfectly (F1 = 1).
    """
    p, t = _binary(pred), _binary(target)
    _same_shape(p, t, "edge_f1")
    if tolerance < 0:
        raise InputError(f"edge_f1: tolerance must be >= 0 pixels, got {tolerance}")
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if n_p == 0 or n_t == 0:
        return {"precision": float(n_p == 0), "recall": float(n_t == 0), "f1": 0.0}
    dist_to_t = distance_transform_edt(~t)
    dist_to_p = distance_transform_edt(~p)
    precision = float((dist_to_t[p] <= tolerance).mean())
    recall = float((dist_to_p[t] <= tolerance).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Structural similarity (scikit-image, data range of uint8 or [0, 1] floats) for soft edges / line art."""
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _same_shape(p, t, "ssim")
    rng = 255.0 if np.asarray(pred).dtype == np.uint8 else 1.0
    channel_axis = 2 if p.ndim == 3 else None
    win = min(7, *p.shape[:2])
    win -= 1 - win % 2  # odd window that fits small maps
    return float(structural_similarity(p, t, data_range=rng, channel_axis=channel_axis, win_size=max(win, 3)))


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [target class, predicted class] of two integer label maps."""
    p, t = np.asarray(pred).astype(np.int64).ravel(), np.asarray(target).astype(np.int64).ravel()
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= n_classes):
        raise InputError(f"confusion_matrix: labels must lie in 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def miou(pred: np.ndarray, target: np.ndarray, match_labels: bool = False) -> float:
    """Mean IoU over the classes present in either map.

    `match_labels`: the two maps come from clustering (label ids are arbitrary, e.g. k-means
    segmentation of two images), so predicted ids are first mapped to target ids by the Hungarian
    assignment that maximises overlap; unmatched predicted ids count as wrong.
    """
    p, t = np.asarray(pred).astype(np.int64), np.asarray(target).astype(np.int64)
    _same_shape(p, t, "miou")
    if min(p.min(), t.min()) < 0:
        raise InputError("miou: label maps must be non-negative integers")
    n = int(max(p.max(), t.max())) + 1
    cm = confusion_matrix(p, t, n)
    if match_labels:
        rows, cols = linear_sum_assignment(cm, maximize=True)
        perm = np.full(n, -1)
        perm[cols] = rows  # predicted id -> target id
        unmatched = perm < 0
        perm[unmatched] = np.arange(n, n + unmatched.sum())
        p = perm[p]
        n2 = n + int(unmatched.sum())
        cm = confusion_matrix(p, t, n2)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def depth_order_accuracy(pred_depth: np.ndarray, target_depth: np.ndarray, instances: np.ndarray) -> float:
    """Of the object pairs at different target depths, the fraction whose order survives in `pred_depth`.

    `instances` labels objects (0 = background); each object's depth is the median over its pixels;
    nearer is brighter (larger) in both maps. NaN when no pair has different depths.
    """
    pd, td, inst = np.asarray(pred_depth, np.float64), np.asarray(target_depth, np.float64), np.asarray(instances)
    _same_shape(pd, td, "depth_order_accuracy")
    _same_shape(pd, inst.astype(np.float64), "depth_order_accuracy (instances)")
    ids = [i for i in np.unique(inst) if i != 0]
    tv = {i: float(np.median(td[inst == i])) for i in ids}
    pv = {i: float(np.median(pd[inst == i])) for i in ids}
    ok = total = 0
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            i, j = ids[a], ids[b]
            if tv[i] == tv[j]:
                continue
            total += 1
            ok += (pv[i] - pv[j]) * (tv[i] - tv[j]) > 0
    return ok / total if total else float("nan")


def depth_rmse(pred_depth: np.ndarray, target_depth: np.ndarray) -> float:
    """Root mean square difference of two depth maps in their own units (the ControlNet++ depth metric)."""
    p, t = np.asarray(pred_depth, np.float64), np.asarray(target_depth, np.float64)
    _same_shape(p, t, "depth_rmse")
    return float(np.sqrt(np.mean((p - t) ** 2)))


def palette_error(pred_image: np.ndarray, target_image: np.ndarray, cells: int = 8) -> float:
    """Mean CIELab deltaE (CIE76) between the coarse palettes (cells x cells area averages) of two RGB images."""
    p, t = np.asarray(pred_image), np.asarray(target_image)
    if p.ndim != 3 or t.ndim != 3 or p.shape[2] != 3 or t.shape[2] != 3:
        raise InputError("palette_error: expected two HxWx3 RGB images")
    if cells < 1:
        raise InputError(f"palette_error: cells must be >= 1, got {cells}")
    import cv2

    def coarse(img: np.ndarray) -> np.ndarray:
        f = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
        return rgb2lab(cv2.resize(f, (cells, cells), interpolation=cv2.INTER_AREA).clip(0, 1))

    return float(deltaE_cie76(coarse(p), coarse(t)).mean())


# ---------------------------------------------------------------- through the annotators

# kind -> (metric name, how to compare the extracted and the input condition)
CONTROL_METRICS: dict[str, str] = {
    "canny": "edge_f1",
    "xdog": "edge_f1",
    "softedge": "ssim",
    "lineart": "ssim",
    "segmentation": "miou",
    "palette": "palette_error",
    "intensity": "ssim",
}


def controllability(
    kind: str, generated: np.ndarray, condition: np.ndarray, tolerance: float = 0.0, **params: Any
) -> dict[str, float]:
    """Extract condition `kind` from `generated` (annotator `params`) and compare it with the input `condition`.

    Returns {metric name: value}; edge kinds give precision/recall/f1 (`tolerance` in pixels). Depth
    has no weight-free extractor: use `depth_order_accuracy` / `depth_rmse` with maps you have.
    """
    if kind not in CONTROL_METRICS:
        raise InputError(f"controllability: kind '{kind}' has no metric; valid: {', '.join(CONTROL_METRICS)}")
    from mmsynth.annotate import annotate  # lazy: the evaluate layer must load without the annotators

    extracted = annotate(kind, generated, **params)
    metric = CONTROL_METRICS[kind]
    if metric == "edge_f1":
        return edge_f1(extracted, condition, tolerance=tolerance)
    if metric == "ssim":
        return {"ssim": ssim(extracted, condition)}
    if metric == "miou":
        return {"miou": miou(extracted, condition, match_labels=True)}
    return {"palette_error": palette_error(extracted, condition)}


def visible_pairs(amodal: list[np.ndarray], min_pixels: int = 4,
                  looks: list[Any] | None = None) -> list[tuple[int, int, np.ndarray]]:
    """(back, front, overlap) for the pairs of silhouettes (listed back to front) whose depth order an image can
    show: those overlapping in at least `min_pixels`, and not alike (`looks`, e.g. colours, differ)."""
    masks = [_binary(a) for a in amodal]
    pairs = []
    for back in range(len(masks)):
        for front in range(back + 1, len(masks)):
            overlap = masks[back] & masks[front]
            if int(overlap.sum()) >= min_pixels and (looks is None or looks[back] != looks[front]):
                pairs.append((back, front, overlap))
    return pairs


def occlusion_order(visible: list[np.ndarray], amodal: list[np.ndarray], min_pixels: int = 4,
                    looks: list[Any] | None = None) -> tuple[int, int]:
    """Depth order as an image of flat shapes can show it: through occlusion.

    `amodal[i]` is object i's full silhouette (objects listed back to front), `visible[i]` the pixels of the
    generated image that look like object i (e.g. its colour). For every pair whose silhouettes overlap in at
    least `min_pixels` pixels, the order holds when the nearer object owns more of the overlap than the farther
    one. Returns (pairs in order, pairs judged); pairs that do not overlap carry no visible order and are skipped,
    and so are pairs whose `looks` (e.g. colours) are equal: two objects that look alike cannot show which is nearer.
    """
    if len(visible) != len(amodal):
        raise InputError(f"occlusion_order: {len(visible)} visible masks for {len(amodal)} objects")
    shown = [_binary(v) for v in visible]
    for a, v in zip(amodal, shown):
        _same_shape(_binary(a), v, "occlusion_order")
    ok = total = 0
    for back, front, overlap in visible_pairs(amodal, min_pixels, looks):
        total += 1
        ok += int((shown[front] & overlap).sum()) > int((shown[back] & overlap).sum())
    return ok, total


def occlusion_contours(edges: np.ndarray, amodal: list[np.ndarray], min_pixels: int = 4,
                       looks: list[Any] | None = None) -> tuple[int, int]:
    """Depth order read from outlines alone, whatever colours the objects got.

    Where the nearer of two overlapping objects covers the farther, the nearer one's outline runs across the
    farther one's inside and the farther one's outline is hidden. For every pair whose silhouettes overlap (listed
    back to front, as `occlusion_order`), compare the share of `edges` (the output's edge map, dilated by one pixel
    to forgive the VAE's shifts) on the front outline inside the back silhouette with the share on the back outline
    inside the front silhouette: in order when the first is larger. When the back outline does not cross the front
    silhouette (the nearer object lies wholly inside the farther one's outline), the front outline decides alone:
    in order when it is drawn on more than half its pixels. Pairs that overlap in fewer than `min_pixels`, whose
    front outline does not cross the back silhouette (the farther object wholly hidden: its absence would look
    the same), or with equal `looks` (alike objects draw no edge between them) are skipped. Returns (in order,
    judged). This separates following the depth map (outlines) from binding the prompt's colours to the shapes,
    which `occlusion_order` needs as well.
    """
    from scipy.ndimage import binary_dilation, binary_erosion

    seen = binary_dilation(_binary(edges), np.ones((3, 3), bool))
    masks = [_binary(a) for a in amodal]
    for m in masks:
        _same_shape(m, seen, "occlusion_contours")
    inner = [binary_erosion(m, np.ones((3, 3), bool)) for m in masks]
    outline = [m & ~i for m, i in zip(masks, inner)]
    ok = total = 0
    for back, front, _ in visible_pairs(masks, min_pixels, looks):
        front_line, back_line = outline[front] & inner[back], outline[back] & inner[front]
        if int(front_line.sum()) < min_pixels:
            continue
        total += 1
        front_share = float(seen[front_line].mean())
        if int(back_line.sum()) >= min_pixels:
            ok += front_share > float(seen[back_line].mean())
        else:
            ok += front_share > 0.5
    return ok, total
