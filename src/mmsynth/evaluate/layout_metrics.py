"""Layout metrics: detections (box, phrase, score) against layout boxes (box, phrase) as ground truth.

Pure functions on normalised xyxy boxes and phrases ("red circle": the class of a box is its colour + shape):

- `average_precision`: COCO-style AP at one IoU threshold (AP50 by default). torchmetrics'
  `MeanAveragePrecision` would be the library route, but on this project's machines it cannot run: its `bbox`
  metric needs torchvision (not installed: its wheels are tied to one torch build) besides a COCO backend
  (pycocotools / faster-coco-eval, neither a dependency). So this is COCOeval's own definition, step by step
  (tests/test_bench_layout.py checks it against pycocotools' COCOeval where that is importable):
  per image and class, detections sorted by score (stable) and cut to `max_dets`; each is greedily matched, in
  that order, to the not yet matched ground-truth box of its class with the highest IoU >= the threshold
  (true positive) or is a false positive; per class over all images (detections merged in a stable score
  order), precision is made monotone from the right and read at the 101 recall points 0, 0.01, .., 1 (0 past
  the highest recall reached); the class's AP is the mean of those 101 values. The AP of the set is the mean
  over the classes that have at least one ground-truth box (a class only ever detected, never laid out, is not
  averaged in, as in COCO: its detections cost nothing there); NaN when there is no ground truth at all.
- `match_layout`: per layout box, the detection of the same phrase assigned to it one-to-one (Hungarian: first
  as many boxes with IoU >= the threshold as possible, then the largest IoU), and that IoU (0 when none). A
  detection serves at most one box, so one large red circle never satisfies two laid-out red circles.
  mean IoU = the mean of these IoUs over layout boxes; phrase accuracy = the share of layout boxes whose IoU
  reaches the threshold (the right colour and shape in the right box).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = Sequence[float]  # normalised [x0, y0, x1, y1]
IOU_THRESHOLD = 0.5
MAX_DETS = 100  # COCO's per-image detection cap (per class here, as COCOeval applies it)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall thresholds


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """len(a) x len(b) IoUs of xyxy boxes (0 for an empty union)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x = np.asarray(a, np.float64)[:, None, :]
    y = np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(x[..., 2], y[..., 2]) - np.maximum(x[..., 0], y[..., 0]), 0, None)
    ih = np.clip(np.minimum(x[..., 3], y[..., 3]) - np.maximum(x[..., 1], y[..., 1]), 0, None)
    inter = iw * ih
    union = (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1]) + (y[..., 2] - y[..., 0]) * (y[..., 3] - y[..., 1])
    union = union - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_layout(layout_boxes: Sequence[Box], layout_phrases: Sequence[str], det_boxes: Sequence[Box],
                 det_phrases: Sequence[str], iou_threshold: float = IOU_THRESHOLD) -> list[tuple[int | None, float]]:
    """Per layout box: (the index of the same-phrase detection assigned to it, their IoU), (None, 0.0) when no
    detection of its phrase is left for it. One-to-one within each phrase (see the module docstring)."""
    out: list[tuple[int | None, float]] = [(None, 0.0)] * len(layout_boxes)
    ious = iou_matrix(layout_boxes, det_boxes)
    for phrase in sorted(set(layout_phrases)):
        rows = [i for i, p in enumerate(layout_phrases) if p == phrase]
        cols = [j for j, p in enumerate(det_phrases) if p == phrase]
        if not cols:
            continue
        sub = ious[np.ix_(rows, cols)]
        gain = (sub >= iou_threshold) + sub  # a hit outweighs any IoU below the threshold
        for r, c in zip(*linear_sum_assignment(gain, maximize=True)):
            out[rows[r]] = (cols[c], float(sub[r, c]))
    return out


def average_precision(ground_truth: Sequence[tuple[Sequence[Box], Sequence[str]]],
                      detections: Sequence[tuple[Sequence[Box], Sequence[str], Sequence[float]]],
                      iou_threshold: float = IOU_THRESHOLD, max_dets: int = MAX_DETS) -> float:  # fmt: skip
    """COCO AP at `iou_threshold` over images: ground_truth[i] = (boxes, phrases) and detections[i] = (boxes,
    phrases, scores) of image i. The mean over classes with ground truth of each class's 101-point interpolated
    AP (module docstring); NaN without any ground-truth box."""
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection images")
    n_gt: dict[str, int] = {}
    ranked: dict[str, list[tuple[float, bool]]] = {}  # per class, (score, true positive) in image order
    for (gt_boxes, gt_phrases), (d_boxes, d_phrases, d_scores) in zip(ground_truth, detections):
        for phrase in gt_phrases:
            n_gt[phrase] = n_gt.get(phrase, 0) + 1
        for phrase in sorted(set(d_phrases)):
            gts = [b for b, p in zip(gt_boxes, gt_phrases) if p == phrase]
            mine = [j for j, p in enumerate(d_phrases) if p == phrase]
            mine = sorted(mine, key=lambda j: -float(d_scores[j]))[:max_dets]  # stable, as COCO's mergesort
            ious = iou_matrix([d_boxes[j] for j in mine], gts)
            used = np.zeros(len(gts), bool)
            for k, j in enumerate(mine):
                free = np.where(used, -1.0, ious[k])  # boxes already matched are out of reach
                best = int(np.argmax(free)) if len(gts) else -1
                tp = best >= 0 and free[best] >= iou_threshold
                if tp:
                    used[best] = True
                ranked.setdefault(phrase, []).append((float(d_scores[j]), bool(tp)))
    aps = []
    for phrase, count in n_gt.items():
        dets = ranked.get(phrase, [])
        order = sorted(range(len(dets)), key=lambda k: -dets[k][0])  # stable: ties keep image order
        tp = np.cumsum([dets[k][1] for k in order], dtype=np.float64)
        fp = np.cumsum([not dets[k][1] for k in order], dtype=np.float64)
        recall = tp / count
        precision = tp / (tp + fp + np.spacing(1))  # COCOeval's own guard against 0 / 0
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
        q = np.zeros(len(RECALL_POINTS))
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        reached = at < len(precision)  # recall points past the highest recall reached stay 0
        q[reached] = precision[at[reached]]
        aps.append(float(np.mean(q)))
    return float(np.mean(aps)) if aps else float("nan")
