"""The `layout` suite: does a layout method put the right object in each box (issue 52)?

Cases: test-split scenes (`sample_scene("test", ...)`, never the `train` split) with 1-4 objects (case j has
1 + j % 4, so every count is a quarter of the cases), generated with seeds from a range no other suite and no
training run uses (`seed * 1_000_003 + 960_000 + j`, valid for n < 40_000: case j keeps its scene and seed for
every n). A case's layout is every object's (amodal box, "colour shape" phrase), stored in the case
(`extra.layout`, the `Layout` JSON objects) so that every row, and every reader of a case file, gets the same
layouts; its prompt is a true caption of the scene (`captions(scene, 1)[0]`), in which every phrase is words of
the prompt (a caption names every group, "two red circles" for a repeated phrase): the attention-based methods
move the attention of those words (`prompt_phrases` gives each phrase as the prompt writes it).

Metrics (src/mmsynth/evaluate/layout_metrics.py), the judge's detections (colour + shape = the class, its fit
score as the confidence) against the layout boxes:
- ap50: COCO-style AP at IoU 0.5, the mean over phrases of the 101-point interpolated AP (n: layout boxes);
- mean_iou: per layout box, the IoU of the same-phrase detection assigned to it one-to-one (0 without one),
  averaged (percentile-bootstrap 95% interval);
- phrase_acc: the share of layout boxes with a same-phrase detection at IoU >= 0.5 (the right colour and shape
  in the right box; Wilson interval); layout_acc: the share of cases where every box is (the per-case verdict);
- fidelity: fd_<extractor> / kid_<extractor> of the row's images against the renders of the same cases, on the
  run's feature extractor as the fidelity suite computes them (unavailable, with the reason, where the bundle
  has no extractor);
- cost_ratio: seconds per image over the no_control row's, measured in the same run.
Rows: ground_truth (the exact renders: the ceiling), vae_ceiling (the renders through the model's VAE),
no_control (the prompt alone, same seeds: the reference of every bar and of cost) and forward (the
`layout-attention` control: each phrase's cross-attention mixed into its boxes; `layout_strength`, `end`
sweepable). A layout method is one `register_layout_row(name, description, make_controls)` call: its controls for
a batch of cases (image i gets case i's layout: `layouts(cases)`), batched like every other row. The report
notes the bars of issue 52 (`bar_notes`) for the rows named `gligen` and `backward`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsynth.data import vocab
from mmsynth.data.captions import captions
from mmsynth.data.scene import Scene, sample_scene
from mmsynth.errors import InputError
from mmsynth.evaluate.bench.cases import DEFAULT_RESOLUTION, Case
from mmsynth.evaluate.bench.control_suite import _bar, _value
from mmsynth.evaluate.bench.generation import (
    SAMPLER_SETTINGS,
    RunContext,
    batched,
    reference_rows,
    register_capability,
    text_to_image,
    text_to_image_batch,
)
from mmsynth.evaluate.bench.registry import Panel, Row, RowScore, Suite, register_row, register_suite
from mmsynth.evaluate.bench.results import RowResult
from mmsynth.evaluate.layout_metrics import IOU_THRESHOLD, average_precision, match_layout
from mmsynth.evaluate.scoring import Metric, mean_ci, rate
from mmsynth.sample.layout import Layout, scene_layout

if TYPE_CHECKING:
    from mmsynth.evaluate.detect import Detection

SUITE_NAME = "layout"
CATEGORY = "layout"
MAX_BOXES = 4  # case j has 1 + j % MAX_BOXES objects
_STREAM = 9_000_000  # scene indices of the test split no other suite draws from
_SEED_OFFSET = 960_000  # generation seeds: above the control suite's (800_000 + 20_000 * 7), below the next seed
LAYOUT_STRENGTH = 0.5  # the forward row's default share of each phrase's attention moved into its boxes
FORWARD_SETTINGS = ("layout_strength", "end", *SAMPLER_SETTINGS)
# rows the bars of issue 52 read (registered by the modules that ship those methods)
GLIGEN_ROW, BACKWARD_ROW, BASELINE_ROW = "gligen", "backward", "no_control"
MIN_LAYOUTS = 300


# ---------------------------------------------------------------- layouts and prompts
def prompt_form(prompt: str, phrase: str) -> str | None:
    """`phrase` as `prompt` writes it: itself, or with its shape word in the plural ("red circles"), as whole
    words (the form whose tokens an attention-based method moves); None when the prompt has neither."""
    words = phrase.split()
    forms = [phrase]
    if words and words[-1] in vocab.SHAPE_PLURALS:
        forms.append(" ".join([*words[:-1], vocab.SHAPE_PLURALS[words[-1]]]))
    text = prompt.lower()
    return next((f for f in forms if re.search(rf"(?<![a-z]){re.escape(f.lower())}(?![a-z])", text)), None)


def case_layout(case: Case) -> Layout:
    """The case's layout: `extra.layout` (what every row is given), else its scene's objects."""
    if "layout" not in case.extra:
        return scene_layout(case.scene)
    return Layout.from_dict(case.extra["layout"], where=f"case '{case.id}': field 'extra.layout'")


def prompt_phrases(case: Case) -> list[str]:
    """Each layout phrase as the case's prompt writes it (singular or plural; see `prompt_form`)."""
    out = []
    for phrase in case_layout(case).phrases:
        form = prompt_form(case.prompt, phrase)
        if form is None:
            raise InputError(f"case '{case.id}': field 'prompt': the layout phrase '{phrase}' is not words of the "
                             f"prompt '{case.prompt}' (attention-based layout methods move those words' attention)")
        out.append(form)
    return out


def layouts(cases: Sequence[Case], as_written: bool = False) -> tuple[list[list[list[float]]], list[list[str]]]:
    """Per image of a batch, its case's boxes and phrases (`as_written`: the phrases as the prompt words them,
    for methods that find them among the prompt's tokens): the per-image lists layout controls take."""
    boxes = [case_layout(c).boxes for c in cases]
    phrases = [prompt_phrases(c) if as_written else case_layout(c).phrases for c in cases]
    return boxes, phrases


def _scene_for(j: int, seed: int) -> tuple[Scene, str]:
    """The j-th scene (1 + j % 4 objects) and a true caption of it in which every phrase is found (every caption
    names every group; scenes are passed over only should none be)."""
    k = 0
    while True:
        s = sample_scene("test", _STREAM + j * 64 + k, seed, n_objects=1 + j % MAX_BOXES)
        k += 1
        for prompt in captions(s, 4):
            if all(prompt_form(prompt, o.phrase) is not None for o in s.objects):
                return s, prompt


def make_cases(n: int, seed: int) -> list[Case]:
    """`n` layouts: case j's scene, prompt, layout and seed do not depend on n."""
    out = []
    for j in range(n):
        scene, prompt = _scene_for(j, seed)
        layout = scene_layout(scene).to_dict()["objects"]
        out.append(Case(id=f"layout/{CATEGORY}/{j:04d}", suite=SUITE_NAME, scene=scene, category=CATEGORY,
                        prompt=prompt, layout=True, resolution=DEFAULT_RESOLUTION,
                        seed=seed * 1_000_003 + _SEED_OFFSET + j,
                        extra={"make_seed": seed, "layout": {"objects": layout}}))  # fmt: skip
    return out


def check(case: Case) -> None:
    """A case's layout parses, its phrases are classes the judge reads ("<colour> <shape>") and words of the
    prompt."""
    for phrase in case_layout(case).phrases:
        words = phrase.split()
        if len(words) != 2 or words[0] not in vocab.COLORS or words[1] not in vocab.SHAPES:
            raise InputError(f"case '{case.id}': field 'extra.layout': phrase '{phrase}' is not '<colour> <shape>' "
                             f"(colours: {', '.join(vocab.COLOR_NAMES)}; shapes: {', '.join(vocab.SHAPES)}): the "
                             "judge scores a box by the colour and shape found in it")  # fmt: skip
    prompt_phrases(case)


# ---------------------------------------------------------------- scoring
@dataclass
class LayoutVerdict:
    """One image against its layout: per layout box, the detection assigned to it and their IoU."""

    layout: Layout
    detections: list[Detection]
    matches: list[int | None]
    ious: list[float]
    threshold: float = IOU_THRESHOLD
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hits(self) -> list[bool]:
        return [j is not None and iou >= self.threshold for j, iou in zip(self.matches, self.ious)]

    @property
    def ok(self) -> bool:
        """Every box holds a detection of its phrase at IoU >= the threshold."""
        return all(self.hits)

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: round(float(v), 4)  # noqa: E731
        return {
            "passed": self.ok,
            "n_boxes": len(self.ious),
            "n_detected": len(self.detections),
            "boxes": [{"phrase": o.phrase, "box": [r(v) for v in o.box], "detection": j, "iou": r(iou), "hit": hit}
                      for o, j, iou, hit in zip(self.layout.objects, self.matches, self.ious, self.hits)],
            "detections": [{"phrase": d.phrase, "box": [r(v) for v in d.box_norm], "score": r(d.score)}
                           for d in self.detections],
        }  # fmt: skip


def judge(case: Case, image: np.ndarray, detections: list[Detection] | None = None) -> LayoutVerdict:
    """The judge's detections in `image` matched to the case's layout (layout_metrics.match_layout)."""
    from mmsynth.evaluate.detect import detect_objects

    layout = case_layout(case)
    dets = detect_objects(image) if detections is None else detections
    pairs = match_layout(layout.boxes, layout.phrases, [d.box_norm for d in dets], [d.phrase for d in dets])
    return LayoutVerdict(layout, dets, [j for j, _ in pairs], [iou for _, iou in pairs])


def layout_metrics(verdicts: Sequence[LayoutVerdict]) -> dict[str, Metric]:
    """ap50, mean_iou, phrase_acc and layout_acc of a row's verdicts (the module docstring)."""
    gts = [(v.layout.boxes, v.layout.phrases) for v in verdicts]
    dets = [([d.box_norm for d in v.detections], [d.phrase for d in v.detections], [d.score for d in v.detections])
            for v in verdicts]  # fmt: skip
    n_boxes = sum(len(v.ious) for v in verdicts)
    hits = sum(sum(v.hits) for v in verdicts)
    return {
        "ap50": Metric(average_precision(gts, dets, IOU_THRESHOLD), n_boxes),
        "mean_iou": mean_ci([iou for v in verdicts for iou in v.ious]),
        "phrase_acc": rate(hits, n_boxes),
        "layout_acc": rate(sum(v.ok for v in verdicts), len(verdicts)),
    }


def fidelity(ctx: RunContext | None, cases: Sequence[Case], images: Sequence[np.ndarray]) -> tuple[
        dict[str, Metric], dict[str, str]]:  # fmt: skip
    """Frechet distance and KID of the images against the renders of the same cases, on the run's feature
    extractor (the fidelity suite's metrics); unavailable with the reason when there is no extractor."""
    from mmsynth.evaluate.bench.fidelity_suite import fidelity_metrics, to_tensor

    if ctx is None:
        return {}, {"fidelity": "scored without a run context (no feature extractor)"}
    try:
        features = ctx.features()
    except InputError as exc:
        return {}, {"fidelity": str(exc)}
    real = to_tensor([c.render() for c in cases], features.size)
    fake = to_tensor(list(images), features.size)
    metrics, unavailable = fidelity_metrics(real, fake, features, None, seed=cases[0].seed)
    keep = [m for m in (*metrics, *unavailable) if m.startswith(("fd", "fid", "kid"))]
    return {m: metrics[m] for m in keep if m in metrics}, {m: unavailable[m] for m in keep if m in unavailable}


def score(ctx: RunContext | None, cases: list[Case], images: list[np.ndarray], references: list[Case]) -> RowScore:
    verdicts = [judge(c, img) for c, img in zip(cases, images)]
    metrics = layout_metrics(verdicts)
    fid, unavailable = fidelity(ctx, cases, images)
    metrics.update(fid)
    return RowScore(metrics, unavailable, verdicts, [v.ok for v in verdicts])


# ---------------------------------------------------------------- report panel
OK_COLOR, BAD_COLOR = (20, 170, 20), (220, 20, 20)


def draw_detections(image: np.ndarray, verdict: LayoutVerdict, zoom: int) -> np.ndarray:
    """`image` upscaled with each detection's box and phrase: green where it fills a layout box of its phrase
    (IoU >= the threshold), red otherwise."""
    import cv2

    from mmsynth.viz import upscale

    big = upscale(image, zoom).copy()
    good = {j for j, hit in zip(verdict.matches, verdict.hits) if hit}
    for k, d in enumerate(verdict.detections):
        color = OK_COLOR if k in good else BAD_COLOR
        x0, y0, x1, y1 = (int(round(v * zoom)) for v in d.box)
        cv2.rectangle(big, (x0, y0), (x1, y1), color, 1, cv2.LINE_AA)
        cv2.putText(big, d.phrase, (max(x0, 1), max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1,
                    cv2.LINE_AA)  # fmt: skip
    return big


def panel(case: Case, image: np.ndarray, verdict: LayoutVerdict) -> Panel:
    """The layout as drawn for people (annotate 'layout') | the output | the output with the judge's boxes."""
    from mmsynth.annotate import annotate

    zoom = max(1, 128 // image.shape[0])  # legible phrases on small images
    h, w = image.shape[:2]
    layout = verdict.layout
    drawn = annotate("layout", np.zeros((h * zoom, w * zoom, 3), np.uint8), boxes=layout.boxes,
                     phrases=layout.phrases)  # fmt: skip
    return [("layout", drawn), ("output", image),
            (f"judge: {sum(verdict.hits)}/{len(verdict.hits)} boxes", draw_detections(image, verdict, zoom))]


# ---------------------------------------------------------------- rows
MakeControls = Callable[[RunContext, list[Case]], list[Any]]


def layout_row(name: str, description: str, make_controls: MakeControls, *, params: dict[str, float] | None = None,
               sweepable: Iterable[str] | None = None, needs: Callable[[Case], list[str]] | None = None,
               kind: str = "method", prompt: Callable[[Case], str] | None = None) -> Row:  # fmt: skip
    """A row of the layout suite: the case's prompt (or `prompt(case)`) through the one sampler with
    `make_controls(ctx, cases)`, the controls of a batch of cases (image i must get case i's layout: take it from
    `layouts(cases)`; the row's settings are in `ctx.params`, the sampler's in `ctx.sampler`).
    `params`: the row's own settings and defaults; `sweepable`: the settings `--sweep` may vary (default: `params`
    and the sampler's); `needs`: the capabilities a case needs (default: text only; e.g. a GLIGEN row declares a
    capability with `register_capability` and lists it here, so a bundle without it skips with a reason)."""
    generate_batch = batched(prompt or (lambda c: c.prompt), make_controls)
    settings = dict(params or {})
    return Row(name, kind, description, lambda ctx, case: generate_batch(ctx, [case])[0],
               generate_batch=generate_batch, needs=needs or (lambda c: ["text"]), params=settings,
               sweepable=tuple(sweepable) if sweepable is not None else (*settings, *SAMPLER_SETTINGS))  # fmt: skip


def register_layout_row(name: str, description: str, make_controls: MakeControls, **kwargs: Any) -> Row:
    """`layout_row(...)` added to the layout suite (what a module shipping a layout method calls)."""
    return register_row(SUITE_NAME, layout_row(name, description, make_controls, **kwargs))


def forward_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Forward layout guidance on cross-attention (`layout-attention`): each phrase, as the prompt words it,
    spends `layout_strength` of its attention inside its boxes, for the schedule's first `end` of the steps."""
    from mmsynth.sample import LayoutAttention, Schedule

    boxes, phrases = layouts(cases, as_written=True)
    return [LayoutAttention(boxes=boxes, phrases=phrases,
                            strength=float(ctx.params.get("layout_strength", LAYOUT_STRENGTH)),
                            schedule=Schedule(end=float(ctx.params.get("end", 1.0))))]  # fmt: skip


GLIGEN_COMPONENT = "gligen"
GLIGEN_BETA = 0.3  # scheduled sampling: grounding on the first 30% of the steps (the pipeline's default)
register_capability("gligen", lambda bundle: GLIGEN_COMPONENT in getattr(bundle, "extras", {}))


def gligen_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """GLIGEN: each object's box and phrase ("red circle", as it was trained) as a grounding token, on the first
    `beta` of the steps (scheduled sampling)."""
    from mmsynth.sample import Schedule
    from mmsynth.sample.gligen import Gligen

    boxes, phrases = layouts(cases)
    return [Gligen(boxes=boxes, phrases=phrases, model=GLIGEN_COMPONENT,
                   schedule=Schedule(end=float(ctx.params.get("beta", GLIGEN_BETA))))]


BACKWARD_ETA = 30.0  # the reference's step size (sample/layout_guidance.py)


def backward_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Backward layout guidance (`layout-guidance`): before each of the first `end` of the steps, the latent moves
    down the gradient of each phrase's out-of-box attention energy (step size `layout_eta`, up to 5 iterations)."""
    from mmsynth.sample import Schedule
    from mmsynth.sample.layout_guidance import LayoutGuidance

    boxes, phrases = layouts(cases)
    return [LayoutGuidance(boxes=boxes, phrases=phrases, eta=float(ctx.params.get("layout_eta", BACKWARD_ETA)),
                           schedule=Schedule(end=float(ctx.params.get("end", 0.2))))]


def regional_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Regional prompts: each box attends to its own phrase as a prompt (masked cross-attention) beside the global
    prompt (`base_ratio` of it inside the regions)."""
    from mmsynth.sample.regional_prompts import RegionalPrompt

    boxes, phrases = layouts(cases)
    return [RegionalPrompt(regions=boxes, prompts=phrases, base_ratio=float(ctx.params.get("base_ratio", 0.2)))]


def gligen_backward_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """GLIGEN and backward guidance together: grounding tokens, and the latent moved toward the boxes."""
    return [*gligen_controls(ctx, cases), *backward_controls(ctx, cases)]


def _rows() -> dict[str, Row]:
    return {
        **reference_rows(),
        "no_control": Row("no_control", "reference", "the prompt alone, same seeds (every bar's reference and the "
                          "cost baseline)", text_to_image, generate_batch=text_to_image_batch,
                          needs=lambda c: ["text"], sweepable=SAMPLER_SETTINGS),
        "forward": layout_row("forward", "forward layout guidance: each phrase's cross-attention mixed into its "
                              "boxes (layout-attention, no gradients)", forward_controls,
                              params={"layout_strength": LAYOUT_STRENGTH, "end": 1.0}, sweepable=FORWARD_SETTINGS),
        GLIGEN_ROW: layout_row(GLIGEN_ROW, "GLIGEN: gated self-attention over box + phrase tokens (the bundle's gligen "
                               "component), grounding on the first `beta` of the steps", gligen_controls,
                               params={"beta": GLIGEN_BETA}, sweepable=("beta", *SAMPLER_SETTINGS),
                               needs=lambda c: ["text", "gligen"]),
        BACKWARD_ROW: layout_row(BACKWARD_ROW, "backward layout guidance (Chen et al.): the latent moved until each "
                                 "phrase's attention falls in its boxes (layout-guidance, first `end` of the steps)",
                                 backward_controls, params={"layout_eta": BACKWARD_ETA, "end": 0.2}),
        "regional": layout_row("regional", "regional prompts: each box attends to its own phrase (masked "
                               "cross-attention), the global prompt at `base_ratio` inside the boxes",
                               regional_controls, params={"base_ratio": 0.2}),
        "gligen_backward": layout_row("gligen_backward", "GLIGEN and backward layout guidance in one call",
                                      gligen_backward_controls, params={"beta": GLIGEN_BETA, "layout_eta": BACKWARD_ETA,
                                                                        "end": 0.2},
                                      needs=lambda c: ["text", "gligen"]),
    }


# ---------------------------------------------------------------- bars (issue 52), as report notes
def bar_notes(rows: list[RowResult]) -> list[str]:
    """The layouts behind the table and each bar of issue 52, met / NOT met / not measured (row absent)."""
    v = lambda row, metric: _value(rows, row, metric)  # noqa: E731
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    base = next((r for r in rows if r.row == BASELINE_ROW and r.sweep is None), None)
    n = base.n_cases if base is not None else max((r.n_cases for r in rows), default=0)
    out = [_bar(f"at least {MIN_LAYOUTS} test layouts (1-{MAX_BOXES} boxes) per row", n >= MIN_LAYOUTS, f"{n}")]
    ap, acc = v(GLIGEN_ROW, "ap50"), v(GLIGEN_ROW, "phrase_acc")
    out.append(_bar(f"{GLIGEN_ROW}: AP50 >= 0.8 and phrase accuracy >= 0.85", None if ap is None or acc is None
                    else ap >= 0.8 and acc >= 0.85, f"AP50 {fmt(ap)}, phrase accuracy {fmt(acc)}"))  # fmt: skip
    b, b0 = v(BACKWARD_ROW, "ap50"), v(BASELINE_ROW, "ap50")
    out.append(_bar(f"{BACKWARD_ROW}: AP50 at least twice {BASELINE_ROW}'s", None if b is None or b0 is None
                    else b >= 2 * b0, f"{fmt(b)} vs {fmt(b0)}"))  # fmt: skip
    return out


SUITE = register_suite(
    Suite(
        name=SUITE_NAME,
        description="layout control (boxes + phrases): AP50, mean box IoU, phrase accuracy, fidelity and cost "
        "per method, the same test layouts for every row",
        make_cases=make_cases,
        score=score,
        panel=panel,
        check=check,
        headline="ap50",
        sweep_metrics=("mean_iou", "phrase_acc"),
        cost_baseline=BASELINE_ROW,
        notes=bar_notes,
        default_n=MIN_LAYOUTS,
        quick_n=MAX_BOXES,  # one layout of each box count
        rows=_rows(),
    )
)
