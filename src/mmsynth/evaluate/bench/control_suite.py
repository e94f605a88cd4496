"""The `control` suite: does each spatial control (ControlNet, T2I-Adapter) control, and does the prompt survive?

Every case is a test-split scene (`sample_scene("test", ...)`: its own RNG stream, never the `train` split the
control recipes learn from), prompted by a true caption, generated with a seed from a range no other suite and no
training run uses (`seed * 1_000_003 + 800_000 + 20_000 * category + j`: case j of a category has the same scene
and seed for every n; the trainer seeds its noise per step from its config seed).
Each case's condition comes from its scene (`annotate.from_scene`): canny of the render, the exact segmentation
(shape class) map, the exact depth map, XDoG of the render (sketch), the render's 8x8 palette.

Categories and metrics (ControlNet++ protocol: extract the condition back out of the output, compare with the
input condition):
- canny: canny_f1 (canny of the output at the condition's thresholds vs the condition, exact pixels) and
  canny_f1_low (both at the second setting, 50/100: weaker edges).
- segmentation: segmentation_miou, the judge's detections painted as a shape-class map vs the exact map.
- depth: depth_order, over pairs of differently coloured objects whose silhouettes overlap (a flat-shape image
  shows depth only there), the fraction where the nearer object's colour owns the overlap; depth_order_contour,
  the same pairs read from outlines alone (the nearer one's outline drawn across the farther, not the reverse):
  the depth map followed, whether or not the prompt's colours went to the right shapes.
- sketch: sketch_ssim, SSIM of the output's XDoG vs the condition.
- palette: palette_error, mean CIELab deltaE of the 8x8 palettes of output and condition (lower is better).
- multi: canny and palette together (multi_canny_f1, multi_palette_error).
- conflict: the canny condition of ANOTHER test scene (embedded in the case as a map) against this scene's
  caption: conflict_canny_f1 against that condition, conflict_attribute_acc against the prompt.
Every category also gets <category>_attribute_acc, the judge's colour+shape accuracy against the prompt.
Rows: ground_truth (renders), vae_ceiling (renders through the VAE), no_control (the prompt alone, same seeds:
every bar's reference), one row per control component (`controlnet_canny`, `controlnet_segmentation`,
`adapter_depth`, `adapter_sketch`, `adapter_palette`: skipped with a reason when the bundle lacks it), `multi`
(canny ControlNet + palette adapter), `composer` (a Composer model given each category's representation alone, on
the same cases: issue 54's comparison with the dedicated controls), `conflict_balanced` / `conflict_prompt` /
`conflict_control` (the canny ControlNet in each control mode). Control rows sweep `scale`, `start`, `end` (and
`mode` for ControlNets: 0 balanced, 1 prompt, 2 control). The report notes each bar of issue 51 as met / not met
(`bar_notes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from mmsynth.data.captions import captions
from mmsynth.data.scene import Background, Scene, ShapeObject, raster_object, sample_scene
from mmsynth.evaluate.bench.cases import Case, ControlSpec
from mmsynth.evaluate.bench.generation import (
    SAMPLER_SETTINGS,
    RunContext,
    batched,
    reference_rows,
    register_capability,
    text_to_image,
    text_to_image_batch,
)
from mmsynth.evaluate.bench.registry import Panel, Row, RowScore, Suite, register_suite
from mmsynth.evaluate.bench.results import RowResult
from mmsynth.evaluate.bench.t2i import panel as judge_panel
from mmsynth.evaluate.scoring import ImageScore, Metric, aggregate, mean_ci, rate, score_image

# category -> the condition kind its cases carry (a `from_scene` kind) and that kind's annotator parameters
CONDITIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "canny": ("canny", {"low": 100, "high": 200}),
    "segmentation": ("segmentation", {}),
    "depth": ("depth", {}),
    "sketch": ("xdog", {}),
    "palette": ("palette", {"cells": 8}),
}
CATEGORIES: tuple[str, ...] = (*CONDITIONS, "multi", "conflict")
CANNY_LOW = {"low": 50, "high": 100}  # the second threshold setting of canny_f1_low
# condition kind -> the bundle component that honours it (capability `control:<kind>`)
COMPONENTS: dict[str, str] = {"canny": "controlnet_canny", "segmentation": "controlnet_segmentation",
                              "depth": "adapter_depth", "xdog": "adapter_sketch", "palette": "adapter_palette"}
MODES: tuple[str, ...] = ("balanced", "prompt", "control")  # the setting `mode` indexes these (ControlNets only)
CONTROL_SETTINGS = ("scale", "start", "end", *SAMPLER_SETTINGS)
CONTROLNET_SETTINGS = (*CONTROL_SETTINGS, "mode")
DEFAULTS: dict[str, float] = {"scale": 1.0, "start": 0.0, "end": 1.0}
MIN_OVERLAP = 4  # pixels of overlap (at the case resolution) that make a pair's depth order visible
COLOR_DISTANCE = 30.0  # CIELab distance within which a pixel counts as an object's colour (the color-region default)
_STREAM = 8_000_000
_SEED_OFFSET = 800_000

for _kind, _component in COMPONENTS.items():
    register_capability(f"control:{_kind}", lambda bundle, c=_component: c in getattr(bundle, "extras", {}))


# ---------------------------------------------------------------- cases
def silhouettes(scene: Scene, resolution: int) -> list[np.ndarray]:
    """Each object's full outline (amodal) at `resolution`: the pixels it covers entirely (rastered 4x finer), so
    an overlap is never a pixel the render blends with its surroundings."""
    fine = [raster_object(o, resolution * 4).reshape(resolution, 4, resolution, 4) for o in scene.objects]
    return [m.all(axis=(1, 3)) for m in fine]


def _overlapping_pairs(scene: Scene, resolution: int) -> int:
    """Pairs of differently coloured objects that overlap: the pairs whose depth order an image can show."""
    from mmsynth.evaluate.control_metrics import visible_pairs

    return len(visible_pairs(silhouettes(scene, resolution), MIN_OVERLAP, [o.color for o in scene.objects]))


_CONFLICT_OTHER = len(CATEGORIES) + 1  # the stream block of the conflict cases' other scenes
_CATEGORY_SEEDS = 20_000  # generation seeds per category: case j of a category keeps its seed whatever n is


def _scene_for(category: str, j: int, seed: int, resolution: int, block: int | None = None) -> Scene:
    """The j-th test scene of a category (from its own block of the stream, so the first j cases are the same for
    every n); depth keeps only scenes where some pair overlaps (visible order)."""
    base = _STREAM + (CATEGORIES.index(category) + 1 if block is None else block) * 100_000
    k = 0
    while True:
        s = sample_scene("test", base + j * 64 + k, seed)
        k += 1
        if category != "depth" or _overlapping_pairs(s, resolution):
            return s


def _spec(kind: str, params: dict[str, Any]) -> ControlSpec:
    return ControlSpec(kind, {} if kind in ("segmentation", "depth") else dict(params))


def make_cases(n: int, seed: int) -> list[Case]:
    """`n` cases per category (7n in all). A conflict case embeds the canny map of another test scene (recorded
    in extra.condition_scene) beside its own scene and caption."""
    from mmsynth.annotate import from_scene
    from mmsynth.evaluate.bench.cases import DEFAULT_RESOLUTION as res
    from mmsynth.sample.controls import encode_value

    out: list[Case] = []
    for category in CATEGORIES:
        for j in range(n):
            scene = _scene_for(category, j, seed, res)
            extra: dict[str, Any] = {"make_seed": seed}
            if category in CONDITIONS:
                controls = [_spec(*CONDITIONS[category])]
            elif category == "multi":
                controls = [_spec(*CONDITIONS["canny"]), _spec(*CONDITIONS["palette"])]
            else:  # conflict: the condition of the next scene of the stream
                other = _scene_for(category, j, seed, res, block=_CONFLICT_OTHER)
                kind, params = CONDITIONS["canny"]
                controls = [ControlSpec(kind, dict(params), encode_value(from_scene(kind, other, res, **params)))]
                extra["condition_scene"] = other.to_dict()
            out.append(Case(id=f"control/{category}/{j:04d}", suite="control", scene=scene, category=category,
                            prompt=captions(scene, 1)[0], controls=controls, resolution=res,
                            seed=seed * 1_000_003 + _SEED_OFFSET + CATEGORIES.index(category) * _CATEGORY_SEEDS + j,
                            extra=extra))  # fmt: skip
    return out


# ---------------------------------------------------------------- scoring
def judge_segmentation(image: np.ndarray) -> np.ndarray:
    """The judge's detections painted as a shape-class map (0 background, class + 1), the most hidden first (the
    judge fits each object's full outline, so a partly covered object must not be painted over its occluder)."""
    from mmsynth.data.geometry import polygon
    from mmsynth.data.render import render_scene
    from mmsynth.data.vocab import SHAPES
    from mmsynth.evaluate.detect import detect_objects

    res = image.shape[0]
    objects = []
    detections = detect_objects(image)
    for d in detections:
        unit = polygon(d.shape, 0.0, 0.0, d.radius, d.rotation)  # the outline about its centre
        (x0, y0, x1, y1), (lo, hi) = d.box_norm, (unit.min(axis=0), unit.max(axis=0))
        cx = x0 - lo[0] if x0 > 0 else x1 - hi[0]  # the box is clipped to the image: use an unclipped side
        cy = y0 - lo[1] if y0 > 0 else y1 - hi[1]
        objects.append(ShapeObject(d.shape, d.color, d.size, float(cx), float(cy), d.radius, d.rotation))
    shown = [d.area / max(int(raster_object(o, res).sum()), 1) for d, o in zip(detections, objects)]
    order = sorted(range(len(objects)), key=lambda i: shown[i])
    classes = np.array([0] + [SHAPES.index(objects[i].shape) + 1 for i in order], np.uint8)
    return classes[render_scene(Scene([objects[i] for i in order], Background("flat", [(0, 0, 0)])), res).instance]


def depth_pairs(image: np.ndarray, scene: Scene, amodal: list[np.ndarray]) -> tuple[int, int]:
    """(pairs in order, overlapping pairs) of the scene's objects (silhouettes `amodal`), read from the colours of
    the output."""
    from mmsynth.annotate import annotate
    from mmsynth.evaluate.control_metrics import occlusion_order

    visible = [annotate("color-region", image, color=o.color, max_distance=COLOR_DISTANCE) for o in scene.objects]
    return occlusion_order(visible, amodal, MIN_OVERLAP, looks=[o.color for o in scene.objects])


def depth_contour_pairs(image: np.ndarray, scene: Scene, amodal: list[np.ndarray]) -> tuple[int, int]:
    """(pairs in order, pairs judged) of the scene's objects (silhouettes `amodal`), read from the outlines in the
    output's canny edges: the depth map followed whatever colours the prompt's words were bound to."""
    from mmsynth.annotate import annotate
    from mmsynth.evaluate.control_metrics import occlusion_contours

    edges = annotate("canny", image, **CONDITIONS["canny"][1])
    return occlusion_contours(edges, amodal, MIN_OVERLAP, looks=[o.color for o in scene.objects])


def condition_scores(kind: str, image: np.ndarray, condition: np.ndarray, case: Case, params: dict[str, Any],
                     from_spec: bool = True) -> dict[str, float | tuple[int, int]]:  # fmt: skip
    """The output scored against one input condition: {metric suffix: value} (depth: a (hits, pairs) count).
    `from_spec`: the condition was derived from the case's scene (not a map embedded in the case)."""
    from mmsynth.annotate import annotate, from_scene
    from mmsynth.evaluate.control_metrics import edge_f1, miou, palette_error, ssim

    if kind == "canny":
        out: dict[str, float | tuple[int, int]] = {"canny_f1": edge_f1(annotate("canny", image, **params),
                                                                       condition)["f1"]}  # fmt: skip
        if from_spec:  # the second setting re-derives the condition from the scene
            low = from_scene("canny", case.scene, case.resolution, **CANNY_LOW)
            out["canny_f1_low"] = edge_f1(annotate("canny", image, **CANNY_LOW), low)["f1"]
        return out
    if kind == "segmentation":
        return {"segmentation_miou": miou(judge_segmentation(image), condition)}
    if kind == "depth":
        amodal = silhouettes(case.scene, image.shape[0])  # rastered once for both readings
        return {"depth_order": depth_pairs(image, case.scene, amodal),
                "depth_order_contour": depth_contour_pairs(image, case.scene, amodal)}
    if kind == "palette":
        return {"palette_error": palette_error(image, condition)}
    return {"sketch_ssim": ssim(annotate(kind, image, **params), condition)}


def _metric_name(case: Case, suffix: str) -> str:
    """canny cases: canny_f1; multi cases: multi_canny_f1; conflict cases: conflict_canny_f1."""
    return suffix if case.category in CONDITIONS else f"{case.category}_{suffix}"


def score(ctx: RunContext, cases: list[Case], images: list[np.ndarray], references: list[Case]) -> RowScore:
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.evaluate.judge import expectation_for

    verdicts = [score_image(expectation_for(prompt=c.prompt), detect_objects(img)) for c, img in zip(cases, images)]
    values: dict[str, list[Any]] = {}
    for case, image in zip(cases, images):
        maps = case.condition_maps()
        for spec in case.controls:
            for suffix, v in condition_scores(spec.kind, image, maps[spec.kind], case, spec.params,
                                             spec.map is None).items():
                values.setdefault(_metric_name(case, suffix), []).append(v)
    metrics: dict[str, Metric] = {}
    for name, vs in values.items():
        if "depth_order" in name:  # a rate over overlapping pairs
            metrics[name] = rate(sum(k for k, _ in vs), sum(n for _, n in vs))
        else:
            metrics[name] = mean_ci([float(v) for v in vs])
    for category in [c for c in CATEGORIES if any(case.category == c for case in cases)]:
        mine: list[ImageScore] = [v for c, v in zip(cases, verdicts) if c.category == category]
        metrics[f"{category}_attribute_acc"] = aggregate(mine)["attribute_acc"]
    return RowScore(metrics, {}, verdicts)


def panel(case: Case, image: np.ndarray, verdict: ImageScore) -> Panel:
    """The case's first condition (label maps stretched to be visible) beside the judge's panel."""
    condition = case.condition_maps()[case.controls[0].kind]
    if condition.ndim == 2 and condition.max() < 32:  # a label map
        condition = (condition.astype(np.float32) * (255.0 / max(int(condition.max()), 1))).astype(np.uint8)
    return [(f"condition: {case.controls[0].kind}", condition), *judge_panel(case, image, verdict)]


# ---------------------------------------------------------------- generation
def control_dict(component: str, image: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The sampling control (sample.controls contract) of a bundle component at the row's settings."""
    schedule = {"scale": float(settings.get("scale", 1.0)), "start": float(settings.get("start", 0.0)),
                "end": float(settings.get("end", 1.0))}  # fmt: skip
    if component.startswith("controlnet_"):
        return {"name": "controlnet", "model": component, "image": image,
                "mode": MODES[int(settings.get("mode", 0))], "schedule": schedule}  # fmt: skip
    return {"name": "t2i-adapter", "model": component, "image": image, "schedule": schedule}


def controls_for(kinds: tuple[str, ...] | None) -> Callable[[RunContext, list[Case]], list[Any]]:
    """The controls of a batch (image i conditioned on case i's map): one per condition kind in `kinds` (None:
    every control of the case), each through the component that honours its kind."""

    def controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
        from mmsynth.annotate.network_input import network_input
        from mmsynth.sample.controls import control_from_dict

        maps = [c.condition_maps() for c in cases]
        out = []
        for spec in cases[0].controls:
            if kinds is not None and spec.kind not in kinds:
                continue
            images = [network_input(spec.kind, m[spec.kind]) for m in maps]  # label maps colour-coded
            image = images[0] if len(images) == 1 else images
            out.append(control_from_dict(control_dict(COMPONENTS[spec.kind], image, ctx.params)))
        return out

    return controls


def _control_row(name: str, description: str, kinds: tuple[str, ...] | None, categories: tuple[str, ...],
                 **settings: float) -> Row:  # fmt: skip
    generate_batch = batched(lambda c: c.prompt, controls_for(kinds))
    controlnet = kinds is None or any(COMPONENTS[k].startswith("controlnet_") for k in kinds)
    return Row(name, "method", description, lambda ctx, case: generate_batch(ctx, [case])[0],
               generate_batch=generate_batch, categories=categories,
               needs=lambda c: ["text", *(f"control:{s.kind}" for s in c.controls if kinds is None or s.kind in kinds)],
               params={**DEFAULTS, **({"mode": 0} if controlnet else {}), **settings},
               sweepable=CONTROLNET_SETTINGS if controlnet else CONTROL_SETTINGS)  # fmt: skip


# category -> the Composer representation that carries its condition (the colour histogram for the palette)
COMPOSER_REPRESENTATIONS: dict[str, str] = {"sketch": "sketch", "segmentation": "segmentation", "depth": "depth",
                                            "palette": "histogram"}
register_capability("composer", lambda bundle: all(
    name in getattr(bundle, "extras", {}) for name in ("composer", "composer_unet")))


def composer_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Composer with one representation per case: its category's (exact maps from the scene, as the dedicated
    control gets; the palette category's colour as the render's CIELab histogram), per image."""
    from mmsynth.annotate import from_scene
    from mmsynth.annotate.network_input import network_input
    from mmsynth.annotate.registry import get_annotator
    from mmsynth.sample.composer import ANNOTATORS, Composer

    name = COMPOSER_REPRESENTATIONS[cases[0].category]
    if name == "histogram":
        values = [get_annotator("histogram")(c.render()).astype(np.float32) for c in cases]
    else:
        kind = ANNOTATORS[name]
        values = [network_input(kind, from_scene(kind, c.scene, c.resolution)) for c in cases]
    return [Composer(conditions={name: values})]


def _rows() -> dict[str, Row]:
    rows = {
        **reference_rows(),
        "no_control": Row("no_control", "reference", "the prompt alone, same seeds (every bar's reference)",
                          text_to_image, generate_batch=text_to_image_batch, needs=lambda c: ["text"],
                          sweepable=SAMPLER_SETTINGS),
    }
    for category, (kind, _) in CONDITIONS.items():
        component = COMPONENTS[kind]
        also = ("multi",) if category in ("canny", "palette") else ()  # the single figures multi is compared with
        rows[component] = _control_row(component, f"the prompt with {component} on the {category} condition",
                                       (kind,), (category, *also))
    rows["multi"] = _control_row("multi", "canny ControlNet + palette adapter together", None, ("multi",))
    composer_batch = batched(lambda c: c.prompt, composer_controls)
    rows["composer"] = Row("composer", "method", "Composer (the bundle's composer components) with each category's "
                           "representation alone: sketch, segmentation, depth, the colour histogram for palette",
                           lambda ctx, case: composer_batch(ctx, [case])[0], generate_batch=composer_batch,
                           categories=tuple(COMPOSER_REPRESENTATIONS), needs=lambda c: ["text", "composer"],
                           sweepable=SAMPLER_SETTINGS)  # fmt: skip
    for i, mode in enumerate(MODES):
        rows[f"conflict_{mode}"] = _control_row(f"conflict_{mode}", f"canny ControlNet, mode '{mode}', on another "
                                                "scene's edges than the prompt's", ("canny",), ("conflict",), mode=i)
    return rows


# ---------------------------------------------------------------- bars (issue 51), as report notes
def _value(rows: list[RowResult], row: str, metric: str) -> float | None:
    r = next((r for r in rows if r.row == row and r.sweep is None and "[" not in r.row), None)
    m = r.metrics.get(metric) if r is not None else None
    return None if m is None or math.isnan(m.value) else m.value


def _bar(label: str, ok: bool | None, detail: str) -> str:
    return f"{label}: {'not measured' if ok is None else 'met' if ok else 'NOT met'} ({detail})"


def bar_notes(rows: list[RowResult]) -> list[str]:
    """Each bar of issue 51 with its figures, met / not met / not measured (a row or metric absent from the run)."""
    v = lambda row, metric: _value(rows, row, metric)  # noqa: E731
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    out = []
    f1, f1_0 = v("controlnet_canny", "canny_f1"), v("no_control", "canny_f1")
    out.append(_bar("canny F1 >= 0.6 and >= +0.3 over no_control", None if f1 is None or f1_0 is None else
                    f1 >= 0.6 and f1 - f1_0 >= 0.3, f"{fmt(f1)} vs {fmt(f1_0)}"))  # fmt: skip
    m = v("controlnet_segmentation", "segmentation_miou")
    out.append(_bar("segmentation mIoU >= 0.7", None if m is None else m >= 0.7, fmt(m)))
    d = v("adapter_depth", "depth_order")
    out.append(_bar("depth order >= 0.9", None if d is None else d >= 0.9, fmt(d)))
    s, s0 = v("adapter_sketch", "sketch_ssim"), v("no_control", "sketch_ssim")
    out.append(f"sketch SSIM (reported): {fmt(s)} vs no_control {fmt(s0)}")
    p, p0 = v("adapter_palette", "palette_error"), v("no_control", "palette_error")
    out.append(_bar("palette error at most half of no_control's", None if p is None or p0 is None else p <= p0 / 2,
                    f"{fmt(p)} vs {fmt(p0)}"))  # fmt: skip
    for category, (kind, _) in CONDITIONS.items():
        a, a0 = v(COMPONENTS[kind], f"{category}_attribute_acc"), v("no_control", f"{category}_attribute_acc")
        out.append(_bar(f"{COMPONENTS[kind]} attribute accuracy within 5 points of no_control",
                        None if a is None or a0 is None else a >= a0 - 0.05, f"{fmt(a)} vs {fmt(a0)}"))  # fmt: skip
    mc, sc = v("multi", "multi_canny_f1"), v("controlnet_canny", "multi_canny_f1")
    mp, sp = v("multi", "multi_palette_error"), v("adapter_palette", "multi_palette_error")
    out.append(_bar("multi canny F1 within 10% of the canny ControlNet alone", None if mc is None or sc is None
                    else mc >= 0.9 * sc, f"{fmt(mc)} vs {fmt(sc)}"))  # fmt: skip
    out.append(_bar("multi palette error within 10% of the palette adapter alone", None if mp is None or sp is None
                    else mp <= 1.1 * sp, f"{fmt(mp)} vs {fmt(sp)}"))  # fmt: skip
    c0, a0 = v("no_control", "conflict_canny_f1"), v("no_control", "conflict_attribute_acc")
    for mode in MODES:
        c, a = v(f"conflict_{mode}", "conflict_canny_f1"), v(f"conflict_{mode}", "conflict_attribute_acc")
        if c is None or a is None or c0 is None or a0 is None:
            out.append(f"conflict, mode {mode}: not measured")
            continue
        followed = (c - c0) / max((f1 if f1 is not None else 1.0) - c0, 1e-6)  # share of the agreeing gain
        kept = a / a0 if a0 > 0 else float("nan")
        winner = "the condition" if followed > kept else "the prompt"
        out.append(f"conflict, mode {mode}: {winner} wins (edge F1 against the other scene's condition {fmt(c)}, "
                   f"no_control {fmt(c0)}; attribute accuracy against the prompt {fmt(a)}, no_control {fmt(a0)})")
    return out


SUITE = register_suite(
    Suite(
        name="control",
        description="spatial controls (ControlNet, T2I-Adapter): condition-following, the prompt kept, conflicts, "
        "multi-control",
        make_cases=make_cases,
        score=score,
        panel=panel,
        headline="canny_f1",
        sweep_metrics=("segmentation_miou", "depth_order", "sketch_ssim", "palette_error", "multi_canny_f1",
                       "multi_palette_error", "conflict_canny_f1", "conflict_attribute_acc"),
        notes=bar_notes,
        default_n=300,
        quick_n=2,
        rows=_rows(),
    )
)
