"""GenEval-like scoring rules with exact semantics: what was expected vs what the detector found.

Expectation comes from a prompt (`parse_caption`) or from a scene spec (all its groups, per-object
sizes and boxes, all group relations). The rules, per image:

Scene relations are deduplicated: (a, left of, b) is kept, its inverse (b, right of, a) is not.

- Matching: expected objects and detections are paired by the Hungarian algorithm
  (`scipy.optimize.linear_sum_assignment`) maximising, per pair, 1 for the right colour + 1 for
  the right shape + 0.25 for the right size (where stated) + the box IoU (only when boxes are
  expected). A pair scoring 0 is no pair. Class agreement dominates; IoU decides among equals.
- A *hit* is an expected object paired with a detection of the right colour AND shape.
- object_f1: micro F1 over all images, TP = hits, FP = detections - hits, FN = expected - hits.
- attribute_acc: hits / expected objects (colour_acc / shape_acc: the paired detection has the
  right colour / shape; an unpaired expected object is wrong for all three).
- count_acc: images whose number of detections equals the expected number of objects.
- binding_acc: over images with >= 2 colour-shape groups: every expected group has exactly its
  count of detections of that colour and shape.
- relation_acc: over expected relations (group a, rel, group b): every member of both groups is a
  hit, and `rel` holds between the box centres of every member pair of a and b by more than
  JUDGE_RELATION_MARGIN (the scene rule of `mmsynth.data.scene.relation_holds` with a smaller
  margin, so that a relation true in the spec stays true under small localisation error).
- relation_direction: the same, over only the relations whose every member is a hit: whether the
  objects, once drawn, are placed the stated way round (chance is below 0.5: a relation holds by a
  margin). It tells a model that cannot place from one that cannot draw the objects.
- size_acc: over expected objects with a stated size: the object is a hit of that size.
- Layout (only when boxes are expected): box_iou is the mean over expected objects of the IoU with
  their hit (0 without one); ap50 is VOC all-point average precision at IoU 0.5 per colour-shape
  class (detections ranked by their fit score), averaged over the classes that occur.

Rates come with Wilson 95% intervals (n = the number of trials behind the rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from mmsynth.data.captions import Group, ParsedCaption, expected_from_scene, parse_caption
from mmsynth.data.scene import Scene, groups
from mmsynth.evaluate.detect import Detection

JUDGE_RELATION_MARGIN = 0.03
SIZE_WEIGHT = 0.25
AP_IOU = 0.5

Box = tuple[float, float, float, float]


@dataclass
class ExpectedObject:
    """One object the image should contain; `size` None = not stated; `box` normalised xyxy or None."""

    color: str
    shape: str
    group: int
    size: str | None = None
    box: Box | None = None


@dataclass
class Expectation:
    """What an image should show: objects (with their group), the groups and relations between groups."""

    objects: list[ExpectedObject]
    groups: list[Group]
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    @property
    def has_boxes(self) -> bool:
        return bool(self.objects) and all(o.box is not None for o in self.objects)

    def without_boxes(self) -> Expectation:
        objs = [ExpectedObject(o.color, o.shape, o.group, o.size, None) for o in self.objects]
        return Expectation(objs, self.groups, self.relations)


def expectation_from_parsed(parsed: ParsedCaption) -> Expectation:
    """Each group of `count` becomes `count` expected objects (no boxes: a prompt has no layout)."""
    objs = [ExpectedObject(g.color, g.shape, gi, g.size) for gi, g in enumerate(parsed.groups) for _ in range(g.count)]
    return Expectation(objs, list(parsed.groups), list(parsed.relations))


def expectation_from_prompt(prompt: str) -> Expectation:
    """Parse a caption of the template grammar (InputError if it does not parse)."""
    return expectation_from_parsed(parse_caption(prompt))


def expectation_from_scene(scene: Scene) -> Expectation:
    """Everything a scene implies: every object with its own size and amodal box, every group relation."""
    parsed = expected_from_scene(scene)
    group_of = {i: gi for gi, members in enumerate(groups(scene)) for i in members}
    objs = [ExpectedObject(o.color, o.shape, group_of[i], o.size, o.box()) for i, o in enumerate(scene.objects)]
    # (a, left of, b) and (b, right of, a) say the same thing: keep each fact once
    rels = [(a, rel, b) for a, rel, b in parsed.relations if a < b]
    return Expectation(objs, parsed.groups, rels)


# ---------------------------------------------------------------- geometry helpers


def box_iou(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes (0 when either is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relation_holds_between(a: tuple[float, float], b: tuple[float, float], rel: str, margin: float) -> bool:
    """`a rel b` for normalised centres (x right, y down), by more than `margin`."""
    return {
        "left of": b[0] - a[0] > margin,
        "right of": a[0] - b[0] > margin,
        "above": b[1] - a[1] > margin,
        "below": a[1] - b[1] > margin,
    }[rel]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k/n (cheap, sane at 0 and 1)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------- per image


def _pair_score(e: ExpectedObject, d: Detection, use_boxes: bool) -> float:
    s = float(e.color == d.color) + float(e.shape == d.shape)
    if e.size is not None:
        s += SIZE_WEIGHT * float(e.size == d.size)
    if use_boxes and e.box is not None:
        s += box_iou(e.box, d.box_norm)
    return s


def match(expected: Expectation, detections: list[Detection]) -> list[int | None]:
    """For each expected object, the index of its paired detection (Hungarian), or None."""
    n_e, n_d = len(expected.objects), len(detections)
    out: list[int | None] = [None] * n_e
    if n_e == 0 or n_d == 0:
        return out
    use_boxes = expected.has_boxes
    score = np.array([[_pair_score(e, d, use_boxes) for d in detections] for e in expected.objects])
    rows, cols = linear_sum_assignment(score, maximize=True)
    for r, c in zip(rows, cols):
        if score[r, c] > 0:
            out[int(r)] = int(c)
    return out


@dataclass
class ImageScore:
    """Everything one image contributes to the aggregate, plus a readable verdict per rule."""

    expected: Expectation
    detections: list[Detection]
    pairs: list[int | None]
    hits: list[bool]
    color_ok: list[bool]
    shape_ok: list[bool]
    size_ok: list[bool | None]  # None where no size is stated
    count_ok: bool
    binding_ok: bool | None  # None: fewer than two groups
    relation_ok: list[bool]
    box_ious: list[float] | None  # per expected object, when boxes are expected

    @property
    def n_hits(self) -> int:
        return sum(self.hits)

    @property
    def passed(self) -> bool:
        """Every rule that applies to this image passes (the GenEval 'image correct' verdict)."""
        return (
            all(self.hits)
            and self.count_ok
            and self.binding_ok is not False
            and all(self.relation_ok)
            and all(s is not False for s in self.size_ok)
        )

    @property
    def relation_placed(self) -> list[bool]:
        """Per expected relation whose every member is a hit: whether it holds (see relation_direction)."""
        out = []
        for (a, _, b), ok in zip(self.expected.relations, self.relation_ok):
            if all(h for h, e in zip(self.hits, self.expected.objects) if e.group in (a, b)):
                out.append(ok)
        return out

    def to_dict(self) -> dict[str, Any]:
        objs = []
        for i, e in enumerate(self.expected.objects):
            j = self.pairs[i]
            objs.append(
                {
                    "expected": f"{e.size + ' ' if e.size else ''}{e.color} {e.shape}",
                    "detection": None if j is None else j,
                    "found": None if j is None else f"{self.detections[j].size} {self.detections[j].phrase}",
                    "hit": self.hits[i],
                    "size_ok": self.size_ok[i],
                    **({"box_iou": round(self.box_ious[i], 4)} if self.box_ious is not None else {}),
                }
            )
        rels = [
            {"relation": f"group {a} {rel} group {b}", "ok": ok}
            for (a, rel, b), ok in zip(self.expected.relations, self.relation_ok)
        ]
        return {
            "passed": self.passed,
            "n_expected": len(self.expected.objects),
            "n_detected": len(self.detections),
            "objects": objs,
            "count_ok": self.count_ok,
            "binding_ok": self.binding_ok,
            "relations": rels,
            "detections": [d.to_dict() for d in self.detections],
        }


def score_image(expected: Expectation, detections: list[Detection]) -> ImageScore:
    """Apply every rule of the module docstring to one image."""
    pairs = match(expected, detections)
    dets = detections
    color_ok = [j is not None and dets[j].color == e.color for e, j in zip(expected.objects, pairs)]
    shape_ok = [j is not None and dets[j].shape == e.shape for e, j in zip(expected.objects, pairs)]
    hits = [c and s for c, s in zip(color_ok, shape_ok)]
    size_ok: list[bool | None] = [
        None if e.size is None else bool(h and dets[j].size == e.size)  # type: ignore[index]
        for e, j, h in zip(expected.objects, pairs, hits)
    ]
    binding_ok = None
    if len(expected.groups) >= 2:
        found = [sum(d.color == g.color and d.shape == g.shape for d in dets) for g in expected.groups]
        binding_ok = all(k == g.count for k, g in zip(found, expected.groups))
    relation_ok = []
    for a, rel, b in expected.relations:
        ma = [i for i, e in enumerate(expected.objects) if e.group == a]
        mb = [i for i, e in enumerate(expected.objects) if e.group == b]
        ok = all(hits[i] for i in ma + mb) and all(
            relation_holds_between(dets[pairs[i]].center, dets[pairs[j]].center, rel, JUDGE_RELATION_MARGIN)  # type: ignore[index]
            for i in ma
            for j in mb
        )
        relation_ok.append(bool(ok))
    box_ious = None
    if expected.has_boxes:
        box_ious = [
            box_iou(e.box, dets[j].box_norm) if h and e.box is not None and j is not None else 0.0
            for e, j, h in zip(expected.objects, pairs, hits)
        ]
    return ImageScore(
        expected=expected,
        detections=detections,
        pairs=pairs,
        hits=hits,
        color_ok=color_ok,
        shape_ok=shape_ok,
        size_ok=size_ok,
        count_ok=len(dets) == len(expected.objects),
        binding_ok=binding_ok,
        relation_ok=relation_ok,
        box_ious=box_ious,
    )


# ---------------------------------------------------------------- aggregate


@dataclass
class Metric:
    """A rate with its number of trials and Wilson 95% interval (interval NaN where not a binomial rate)."""

    value: float
    n: int
    low: float = float("nan")
    high: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        def r(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 4)

        return {"value": r(self.value), "n": self.n, "ci95": [r(self.low), r(self.high)]}


def rate(k: int, n: int) -> Metric:
    """k successes of n trials, with its Wilson 95% interval."""
    lo, hi = wilson(k, n)
    return Metric(k / n if n else float("nan"), n, lo, hi)


def mean_ci(values: list[float]) -> Metric:
    """The mean of per-image values with a seeded percentile-bootstrap 95% interval (NaN below 2 values).

    Bootstrap rather than mean +- 1.96 sd: per-image values are bounded and skewed (PSNR is capped at
    100 dB for exact pixels, palette errors are >= 0), and a normal interval runs past those bounds.
    """
    from scipy.stats import bootstrap

    v = np.asarray(values, np.float64)
    if v.size == 0:
        return Metric(float("nan"), 0)
    mean = float(v.mean())
    if v.size < 2:
        return Metric(mean, 1)
    if np.all(v == v[0]):
        return Metric(mean, int(v.size), mean, mean)
    ci = bootstrap((v,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval  # fmt: skip
    return Metric(mean, int(v.size), float(ci.low), float(ci.high))


def average_precision(scores: list[ImageScore], iou: float = AP_IOU) -> Metric:
    """VOC all-point AP at `iou`, per colour-shape class, averaged over classes with ground truth."""
    classes: dict[tuple[str, str], tuple[list[tuple[float, bool]], int]] = {}
    for s in scores:
        if not s.expected.has_boxes:
            continue
        gts: dict[tuple[str, str], list[Box]] = {}
        for e in s.expected.objects:
            gts.setdefault((e.color, e.shape), []).append(e.box)  # type: ignore[arg-type]
        for key, boxes in gts.items():
            entry = classes.setdefault(key, ([], 0))
            classes[key] = (entry[0], entry[1] + len(boxes))
        for key in {(d.color, d.shape) for d in s.detections}:
            boxes = gts.get(key, [])
            used = [False] * len(boxes)
            for d in sorted((d for d in s.detections if (d.color, d.shape) == key), key=lambda d: -d.score):
                ious = [box_iou(b, d.box_norm) if not u else -1.0 for b, u in zip(boxes, used)]
                k = int(np.argmax(ious)) if ious else -1
                tp = k >= 0 and ious[k] >= iou
                if tp:
                    used[k] = True
                classes.setdefault(key, ([], 0))[0].append((d.score, tp))
    aps = []
    for dets, n_gt in classes.values():
        if n_gt == 0:
            continue
        dets.sort(key=lambda x: -x[0])
        tp = np.cumsum([t for _, t in dets]) if dets else np.zeros(0)
        fp = np.cumsum([not t for _, t in dets]) if dets else np.zeros(0)
        rec = np.concatenate([[0.0], tp / n_gt, [1.0]]) if dets else np.array([0.0, 1.0])
        prec = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]]) if dets else np.array([1.0, 0.0])
        prec = np.maximum.accumulate(prec[::-1])[::-1]
        aps.append(float(np.sum((rec[1:] - rec[:-1]) * prec[1:])))
    return Metric(float(np.mean(aps)) if aps else float("nan"), len(aps))


def aggregate(scores: list[ImageScore]) -> dict[str, Metric]:
    """Dataset-level metrics (see the module docstring for each definition)."""
    n_exp = sum(len(s.expected.objects) for s in scores)
    n_det = sum(len(s.detections) for s in scores)
    tp = sum(s.n_hits for s in scores)
    f1 = 2 * tp / (n_exp + n_det) if n_exp + n_det else float("nan")
    out = {
        "object_f1": Metric(f1, n_exp),
        "precision": rate(tp, n_det),
        "recall": rate(tp, n_exp),
        "attribute_acc": rate(tp, n_exp),
        "color_acc": rate(sum(sum(s.color_ok) for s in scores), n_exp),
        "shape_acc": rate(sum(sum(s.shape_ok) for s in scores), n_exp),
        "count_acc": rate(sum(s.count_ok for s in scores), len(scores)),
    }
    bind = [s.binding_ok for s in scores if s.binding_ok is not None]
    out["binding_acc"] = rate(sum(bind), len(bind))
    rels = [ok for s in scores for ok in s.relation_ok]
    out["relation_acc"] = rate(sum(rels), len(rels))
    placed = [ok for s in scores for ok in s.relation_placed]
    out["relation_direction"] = rate(sum(placed), len(placed))
    sizes = [ok for s in scores for ok in s.size_ok if ok is not None]
    out["size_acc"] = rate(sum(sizes), len(sizes))
    out["image_acc"] = rate(sum(s.passed for s in scores), len(scores))
    with_boxes = [s for s in scores if s.box_ious is not None]
    if with_boxes:
        ious = [v for s in with_boxes for v in s.box_ious]  # type: ignore[union-attr]
        out["box_iou"] = Metric(float(np.mean(ious)), len(ious))
        out["ap50"] = average_precision(with_boxes)
    return out


HEADLINE: tuple[str, ...] = ("object_f1", "attribute_acc", "binding_acc", "count_acc", "relation_acc")


def format_table(metrics: dict[str, Metric], title: str = "") -> str:
    """A plain-text table: metric, value, n, 95% interval."""
    lines = [title] if title else []
    lines.append(f"{'metric':<14} {'value':>7} {'n':>7}  ci95")
    for name, m in metrics.items():
        v = "   n/a" if math.isnan(m.value) else f"{m.value:7.4f}"
        ci = "" if math.isnan(m.low) else f"[{m.low:.4f}, {m.high:.4f}]"
        lines.append(f"{name:<14} {v:>7} {m.n:>7}  {ci}")
    return "\n".join(lines)
