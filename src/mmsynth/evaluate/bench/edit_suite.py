"""The `edit` suite: DDIM inversion, prompt-swap editing, image-to-image and blended-latent inpainting.

Every case edits a source image: the render of `extra.source` (a scene spec; for inversion, the case's own scene).
The case's `scene` is what the edited image should show, so the judge checks it like any other spec.
Categories:
- inversion: DDIM-invert the render under its caption, reconstruct. inversion_psnr (dB, mean; identical images
  count as PSNR_CAP).
- swap: one object changes colour ("a red circle" -> "a blue circle"). edit_success: the judge finds exactly the
  edited scene (right colour and shape) AND the object stays where it was (box IoU >= KEEP_IOU with the source's
  box); kept_psnr: PSNR outside the object's box against the source (how much of the rest survives).
- inpaint: one object of a two-object scene is replaced by another colour and shape inside a box mask.
  inpaint_outside_psnr (pixels outside the mask vs the source), inpaint_inside_acc (a detection of the new colour
  and shape centred inside the mask), exemplar_ssim (SSIM of the mask's box against the case's exemplar resized
  into it: ~1 for a copy-paste) and paste_rate (the share at SSIM >= PASTE_SSIM).
Rows: ground_truth (renders of the edited specs: the ceiling), regenerate (the target prompt from fresh noise: what
an edit must beat on keeping things), inversion rows per reconstruction scheduler (cfg 1), inversion_null_text
(null-text inversion: rebuilt at cfg 5, where plain inversion drifts), swap (invert with the source
caption, sample with the edited one, negative-prompt inversion), swap_attention (also replaying the source's
self-attention for the first half of the steps), swap_partial (invert only half the steps and edit from there),
swap_recolour (swap_partial with recolour guidance: the region guide draws the new colour into the old colour's
pixels, its backward steps confined there),
img2img (SDEdit at a strength), inpaint (blended latents with the text-to-image UNet), inpaint_unet (the
bundle's inpainting UNet, told the mask and the masked image; skipped for a bundle without one), inpaint_resample
(RePaint-style: each step redone from its re-noised
blend), inpaint_guided (the region guide composed), inpaint_layout (resampled, with the new object's phrase's
cross-attention moved into the mask's box: `layout_strength`), inpaint_latent_only (without pasting the known pixels
back) and paint_by_example (the new object's image, rendered alone and turned by a case-seeded angle, painted in
with no prompt; skipped for a bundle without the components); the other inpainting rows prompt the edited scene's
caption (the setting object_prompt=1: the new object alone).
Every model row gets cost_ratio against `regenerate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from mmsynth.data.captions import captions, group_phrase, scene_groups
from mmsynth.data.render import render
from mmsynth.data.scene import Scene, ShapeObject, groups, sample_scene
from mmsynth.data.vocab import COLOR_NAMES, COLORS, HELDOUT_COMBOS, SHAPES
from mmsynth.errors import InputError
from mmsynth.evaluate.bench.cases import Case
from mmsynth.evaluate.bench.generation import (
    SAMPLER_SETTINGS,
    RunContext,
    batched,
    ground_truth,
    register_capability,
    text_to_image,
    text_to_image_batch,
)
from mmsynth.evaluate.bench.registry import Panel, Row, RowScore, Suite, register_suite
from mmsynth.evaluate.scoring import ImageScore, Metric, mean_ci, rate, score_image
from mmsynth.sample.request import DEFAULT_CFG, DEFAULT_INVERSION_CFG, DEFAULT_INVERSION_STEPS

CATEGORIES: tuple[str, ...] = ("inversion", "swap", "inpaint")
INVERSION_SCHEDULERS: tuple[str, ...] = ("ddim", "dpmpp-2m", "unipc", "euler")
INVERSION_STEPS = EDIT_STEPS = DEFAULT_INVERSION_STEPS  # `mmsynth invert|edit`'s default, so the bench scores it
KEEP_IOU = 0.5
NULL_TEXT_STEPS = 10  # Adam steps per sampling step of null-text inversion (Mokady et al.'s setting)
PSNR_CAP = 100.0  # dB given to pixel-identical images, so a mean stays finite
SWAP_STRENGTH = 0.5  # swap_partial: invert half the steps (seed 5, n = 60: 0.70 vs 0.63 at 0.4 and 0.62 at 0.6)
SWAP_SETTINGS = ("strength", "keep_attention", "cross_attention", "null_text", "recolour", *SAMPLER_SETTINGS)
RECOLOUR_STEPS = 5  # swap_recolour: backward steps of the region guide (seed 5, n = 40: 0.85 vs 0.68 without)
INPAINT_SETTINGS = ("resample", "resample_until", "jump_length", "object_prompt", "layout_strength", "blend",
                    *SAMPLER_SETTINGS)
LAYOUT_STRENGTH = 0.5  # inpaint_layout: the share of the new object's attention moved into the mask's box
INPAINT_RESAMPLE = 3  # inpaint_resample: passes per step (seed 5, n = 60: 0.50 vs 0.27 without; 5 passes 0.43)
MASK_MARGIN = 0.03  # the inpainting box mask is the union of the old and new boxes grown by this (normalised)
_STREAM = 7_000_000


# ---------------------------------------------------------------- cases
def _allowed(color: str, shape: str) -> bool:
    return (color, shape) not in HELDOUT_COMBOS


def _recolour(o: ShapeObject, color: str, shape: str | None = None) -> ShapeObject:
    return dataclasses.replace(o, color=color, shape=shape or o.shape, rgb=COLORS[color])


def _phrases(scene: Scene) -> str:
    return " and ".join(group_phrase(g) for g in scene_groups(scene))


def _case(category: str, j: int, seed: int, rng: np.random.Generator) -> dict:
    base = _STREAM + (CATEGORIES.index(category) + 1) * 100_000
    k = 0
    while True:
        index = base + j * 64 + k
        k += 1
        if category == "inversion":
            s = sample_scene("test", index, seed, n_objects=1 + (j + k) % 3)
            return {"scene": s, "prompt": captions(s, 1)[0]}
        if category == "swap":
            s = sample_scene("test", index, seed, n_objects=1)
            o = s.objects[0]
            new = [c for c in COLOR_NAMES if c != o.color and _allowed(c, o.shape)]
            edited = dataclasses.replace(s, objects=[_recolour(o, str(rng.choice(new)))])
            return {"scene": edited, "prompt": _phrases(edited),
                    "extra": {"source": s.to_dict(), "source_prompt": _phrases(s)}}  # fmt: skip
        s = sample_scene("test", index, seed, n_objects=2)
        if len(groups(s)) != 2:
            continue
        t = int(rng.integers(2))
        o, other = s.objects[t], s.objects[1 - t]
        combos = [(c, sh) for c in COLOR_NAMES for sh in SHAPES
                  if c not in (o.color, other.color) and sh != o.shape and _allowed(c, sh)]  # fmt: skip
        color, shape = combos[int(rng.integers(len(combos)))]
        objs = list(s.objects)
        objs[t] = _recolour(o, color, shape)
        edited = dataclasses.replace(s, objects=objs)
        a, b = o.box(), objs[t].box()
        m = MASK_MARGIN
        box = [max(0.0, min(a[0], b[0]) - m), max(0.0, min(a[1], b[1]) - m),
               min(1.0, max(a[2], b[2]) + m), min(1.0, max(a[3], b[3]) + m)]  # fmt: skip
        return {"scene": edited, "prompt": _phrases(edited), "mask": {"box": box},
                "extra": {"source": s.to_dict(), "target_object": t}}  # fmt: skip


def make_cases(n: int, seed: int) -> list[Case]:
    """`n` cases per category, each with its own generation seed."""
    rng = np.random.default_rng([seed, 0xED17])
    out = []
    for category in CATEGORIES:
        for j in range(n):
            d = _case(category, j, seed, rng)
            extra = {"make_seed": seed, **d.get("extra", {})}
            out.append(Case(id=f"edit/{category}/{j:04d}", suite="edit", scene=d["scene"], category=category,
                            prompt=d["prompt"], mask=d.get("mask"), seed=seed * 1_000_003 + 700_000 + len(out),
                            extra=extra))  # fmt: skip
    return out


def source_scene(case: Case) -> Scene:
    """The scene of the image being edited: `extra.source`, or the case's own scene (inversion)."""
    src = case.extra.get("source")
    return case.scene if src is None else Scene.from_dict(src, where=f"case '{case.id}': field 'extra.source'")


def source_image(case: Case) -> np.ndarray:
    return render(source_scene(case), case.resolution)


def mask_array(case: Case) -> np.ndarray:
    """The case's inpainting mask as an HxW bool array (True = repaint)."""
    if case.mask is None:
        raise InputError(f"case '{case.id}': an inpainting case needs a 'mask'")
    if "object" in case.mask:
        return box_mask(source_scene(case).objects[case.mask["object"]].box(), case.resolution)
    return box_mask(case.mask["box"], case.resolution)


def new_object(case: Case) -> ShapeObject:
    """The object an inpainting case asks for (the edited scene's `extra.target_object`)."""
    return case.scene.objects[int(case.extra.get("target_object", 0))]


def box_mask(box: tuple[float, ...] | list[float], r: int) -> np.ndarray:
    """An r x r bool mask of the pixels a normalised [x0, y0, x1, y1] box touches."""
    out = np.zeros((r, r), bool)
    out[int(np.floor(box[1] * r)): int(np.ceil(box[3] * r)), int(np.floor(box[0] * r)): int(np.ceil(box[2] * r))] = 1
    return out


def check(case: Case) -> None:
    if case.category in ("swap", "inpaint") and "source" not in case.extra:
        raise InputError(f"case '{case.id}': field 'extra.source': a {case.category} case needs its source scene")
    if case.category == "swap" and not isinstance(case.extra.get("source_prompt"), str):
        raise InputError(f"case '{case.id}': field 'extra.source_prompt': a swap case needs the source caption")
    if case.category == "swap" and len(source_scene(case).objects) != len(case.scene.objects):
        raise InputError(f"case '{case.id}': a swap case's source and scene must have the same objects")
    if case.category == "inpaint":
        mask_array(case)


# ---------------------------------------------------------------- rows
def inversion(scheduler: str) -> Callable[[RunContext, Case], np.ndarray]:
    """DDIM inversion of the render under its caption, reconstructed with `scheduler` at the row's steps and cfg."""

    def generate(ctx: RunContext, case: Case) -> np.ndarray:
        from mmsynth.sample import invert, reconstruct

        s = ctx.sampler
        x_t = invert(ctx.bundle(), source_image(case), case.prompt, steps=s.steps, cfg=s.cfg).latents
        return reconstruct(ctx.bundle(), x_t, case.prompt, steps=s.steps, cfg=s.cfg, scheduler=scheduler).images[0]

    return generate


def inversion_batch(scheduler: str) -> Callable[[RunContext, list[Case]], list[np.ndarray]]:
    """The inversion row for several cases at once: one batched inversion, one batched reconstruction (each
    image as alone: inversion draws no noise)."""

    def generate(ctx: RunContext, cases: list[Case]) -> list[np.ndarray]:
        from mmsynth.sample import invert, reconstruct

        s, prompts = ctx.sampler, [c.prompt for c in cases]
        x_t = invert(ctx.bundle(), [source_image(c) for c in cases], prompts, steps=s.steps, cfg=s.cfg).latents
        return list(reconstruct(ctx.bundle(), x_t, prompts, steps=s.steps, cfg=s.cfg, scheduler=scheduler).images)

    return generate


def null_text_batch(ctx: RunContext, cases: list[Case]) -> list[np.ndarray]:
    """Null-text inversion of each render under its caption, rebuilt at the row's cfg with the tuned embeddings
    (one batch: image i as alone, the tuning is per image and draws no noise)."""
    from mmsynth.sample import GenerationRequest, NullTextInversion, sample

    s, prompts, r = ctx.sampler, [c.prompt for c in cases], cases[0].resolution
    if any(c.resolution != r for c in cases):
        return [image for c in cases for image in null_text_batch(ctx, [c])]
    control = NullTextInversion(image=[source_image(c) for c in cases], source_prompt=prompts,
                                inner_steps=int(ctx.params.get("null_text", NULL_TEXT_STEPS)))
    request = GenerationRequest(prompt=prompts, steps=s.steps, cfg=s.cfg, n=len(cases), height=r, width=r)
    return list(sample(ctx.bundle(), request, [control], progress=False).images)


def swap_batch(ctx: RunContext, cases: list[Case]) -> list[np.ndarray]:
    """Invert each source with its caption, sample with the edited one (negative-prompt inversion: the source
    caption is the negative prompt), optionally replaying the source's self-attention (`keep_attention`); the
    cases go as one batch when their seeds run on consecutively (image i as alone), otherwise one by one."""
    from mmsynth.sample import sample
    from mmsynth.sample.edit import edit_controls

    s, first = ctx.sampler, cases[0]
    if any(c.seed != first.seed + i for i, c in enumerate(cases)):
        return [image for c in cases for image in swap_batch(ctx, [c])]
    request, controls = edit_controls(
        [source_image(c) for c in cases], [c.extra["source_prompt"] for c in cases], [c.prompt for c in cases],
        steps=s.steps, cfg=s.cfg, seed=first.seed, scheduler=s.scheduler,
        keep_attention=float(ctx.params.get("keep_attention", 0.0)),
        cross_attention=float(ctx.params.get("cross_attention", 0.0)), strength=float(ctx.params.get("strength", 1.0)),
        null_text=int(ctx.params.get("null_text", 0)), recolour=int(ctx.params.get("recolour", 0)))
    return list(sample(ctx.bundle(), request, controls, progress=False).images)


def swap(ctx: RunContext, case: Case) -> np.ndarray:
    return swap_batch(ctx, [case])[0]


def img2img_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """SDEdit: each source noised to the row's strength, denoised under its edited prompt."""
    from mmsynth.sample import Img2Img

    return [Img2Img(image=[source_image(c) for c in cases], strength=float(ctx.params["strength"]))]


def inpaint_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Blended-latent inpainting of each case's mask under the edited scene's prompt (paste-back per the row)."""
    from mmsynth.sample import BlendedInpaint

    masks = [mask_array(c).astype(np.uint8) * 255 for c in cases]
    p = ctx.params
    return [BlendedInpaint(image=[source_image(c) for c in cases], mask=masks, paste=bool(p.get("paste", 1)),
                           resample=int(p.get("resample", 1)), resample_until=float(p.get("resample_until", 1.0)),
                           jump_length=int(p.get("jump_length", 1)),
                           unet="inpainting" if p.get("inpainting_unet", 0) else "base", blend=bool(p.get("blend", 1)))]


def inpaint_guided_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Inpainting composed with universal guidance: the region guide draws the new object's colour (what the
    prompt asks) into the mask, the user's two inputs; nothing of the target's exact box is used."""
    from mmsynth.sample import UniversalGuidance
    from mmsynth.sample.guides import PerImageGuides, build_guide

    p, bundle = ctx.params, ctx.bundle()
    guides = PerImageGuides([build_guide("region", {"mask": mask_array(c).astype(np.uint8) * 255,
                                                    "color": new_object(c).color}, bundle) for c in cases])
    return [*inpaint_controls(ctx, cases),
            UniversalGuidance(guide=guides, s0=float(p["s0"]), m=int(p["m"]), lr=float(p["lr"]))]


def mask_box(case: Case) -> list[float]:
    """The normalised [x0, y0, x1, y1] box of the case's mask (a 'box' mask, or the source object's box)."""
    mask_array(case)  # the same checks
    if "object" in case.mask:
        return list(source_scene(case).objects[case.mask["object"]].box())
    return [float(v) for v in case.mask["box"]]


def inpaint_layout_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Inpainting composed with forward layout guidance on cross-attention: the new object's phrase (words of the
    prompt) spends `layout_strength` of its attention inside the mask's box; nothing of the target's box is used."""
    from mmsynth.sample import LayoutAttention

    phrases = [[_phrases(dataclasses.replace(c.scene, objects=[new_object(c)]))] for c in cases]
    layout = LayoutAttention(boxes=[[mask_box(c)] for c in cases], phrases=phrases,
                             strength=float(ctx.params.get("layout_strength", LAYOUT_STRENGTH)))
    return [*inpaint_controls(ctx, cases), layout]


def inpaint_prompt(ctx: RunContext, case: Case) -> str:
    """The text of an inpainting case: the edited scene's caption, or with the row setting `object_prompt` 1 the new
    object alone (Blended Latent Diffusion's convention: the text describes what goes in the mask)."""
    if not float(ctx.params.get("object_prompt", 0)):
        return case.prompt
    return _phrases(dataclasses.replace(case.scene, objects=[new_object(case)]))


EXEMPLAR_ROTATION = 25.0  # degrees: each case's exemplar is turned by a case-seeded angle within this, both ways
EXEMPLAR_MARGIN = 0.04  # the exemplar crop: the object's box plus this share of the image side
PASTE_SSIM = 0.9  # an output whose mask region matches the exemplar resized into it this closely counts as a paste
register_capability("paint_by_example", lambda bundle: all(
    name in getattr(bundle, "extras", {}) for name in ("paint_by_example_unet", "paint_by_example_encoder")))


def exemplar_image(case: Case) -> np.ndarray:
    """The exemplar of an inpainting case: the new object rendered alone, cropped with a margin and turned by a
    case-seeded angle (so that pasting it would not even fit the mask's box)."""
    import cv2

    r = case.resolution
    alone = render(dataclasses.replace(case.scene, objects=[new_object(case)]), r)
    x0, y0, x1, y1 = new_object(case).box()
    m = EXEMPLAR_MARGIN
    a, b = int(max(0.0, x0 - m) * r), int(max(0.0, y0 - m) * r)
    c, d = int(np.ceil(min(1.0, x1 + m) * r)), int(np.ceil(min(1.0, y1 + m) * r))
    crop = np.ascontiguousarray(alone[b: max(d, b + 1), a: max(c, a + 1)])
    angle = float(np.random.default_rng([case.seed, 0xE8]).uniform(-EXEMPLAR_ROTATION, EXEMPLAR_ROTATION))
    h, w = crop.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(crop, turn, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def exemplar_ssim(case: Case, image: np.ndarray) -> float:
    """SSIM of the output's mask box against the exemplar resized into that box: about 1 for a copy-paste of the
    exemplar, low for an object drawn to fit the hole."""
    import cv2
    from skimage.metrics import structural_similarity

    ys, xs = np.nonzero(mask_array(case))
    region = image[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    pasted = cv2.resize(exemplar_image(case), (region.shape[1], region.shape[0]), interpolation=cv2.INTER_AREA)
    side = min(region.shape[:2])
    window = max(3, min(7, side if side % 2 else side - 1))
    return float(structural_similarity(region, pasted, channel_axis=2, win_size=window, data_range=255))


def paint_by_example_controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
    """Paint-by-Example: each case's exemplar (the new object alone, turned) painted into its mask, no prompt."""
    from mmsynth.sample import PaintByExample

    masks = [mask_array(c).astype(np.uint8) * 255 for c in cases]
    return [PaintByExample(image=[source_image(c) for c in cases], mask=masks,
                           exemplar=[exemplar_image(c) for c in cases], paste=bool(ctx.params.get("paste", 1)))]


def img2img(ctx: RunContext, case: Case) -> np.ndarray:
    return ctx.generate(case, img2img_controls(ctx, [case]))


Generator = Callable[[RunContext, Case], np.ndarray]
BatchGenerator = Callable[[RunContext, list[Case]], list[np.ndarray]]


def inpainter(controls_of: Callable[[RunContext, list[Case]], list[Any]]) -> tuple[Generator, BatchGenerator]:
    """(one case, a batch of cases) generators of an inpainting row under its prompt setting."""

    def one(ctx: RunContext, case: Case) -> np.ndarray:
        return ctx.generate(case, controls_of(ctx, [case]), prompt=inpaint_prompt(ctx, case))

    def batch(ctx: RunContext, cases: list[Case]) -> list[np.ndarray]:
        return batched(lambda c: inpaint_prompt(ctx, c), controls_of)(ctx, cases)

    return one, batch


# ---------------------------------------------------------------- scoring
def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (over `mask` if given), capped at PSNR_CAP for identical pixels."""
    from mmsynth.evaluate.fidelity import psnr as exact_psnr

    return min(PSNR_CAP, exact_psnr(a, b, mask))


def _swap_verdict(case: Case, image: np.ndarray) -> tuple[ImageScore, bool, float]:
    """(judge verdict against the edited spec with boxes, edit success, PSNR outside the objects' boxes)."""
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.evaluate.judge import expectation_for

    v = score_image(expectation_for(scene=case.scene, layout=True), detect_objects(image))
    kept = v.box_ious is not None and all(iou >= KEEP_IOU for iou in v.box_ious)
    ok = v.passed and kept
    r = case.resolution
    objects = np.zeros((r, r), bool)
    for o in source_scene(case).objects:
        objects |= box_mask(o.box(), r)
    return v, ok, psnr(image, source_image(case), ~objects)


def _inpaint_verdict(case: Case, image: np.ndarray) -> tuple[ImageScore, bool, float]:
    """(judge verdict against the edited spec, the new object found inside the mask, PSNR outside the mask)."""
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.evaluate.judge import expectation_for

    dets = detect_objects(image)
    v = score_image(expectation_for(scene=case.scene), dets)
    mask = mask_array(case)
    new = new_object(case)
    r = case.resolution

    def inside(d) -> bool:
        x0, y0, x1, y1 = d.box_norm
        cx, cy = min(int((x0 + x1) / 2 * r), r - 1), min(int((y0 + y1) / 2 * r), r - 1)
        return bool(mask[cy, cx])

    ok = any(d.color == new.color and d.shape == new.shape and inside(d) for d in dets)
    return v, ok, psnr(image, source_image(case), ~mask)


def score(ctx: RunContext, cases: list[Case], images: list[np.ndarray], references: list[Case]) -> RowScore:
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.evaluate.judge import expectation_for

    metrics: dict[str, Metric] = {}
    verdicts: list[ImageScore] = []
    psnrs: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    oks: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    copies: list[float] = []
    for c, img in zip(cases, images):
        if c.category == "swap":
            v, ok, p = _swap_verdict(c, img)
            oks["swap"].append(ok)
            psnrs["swap"].append(p)
        elif c.category == "inpaint":
            v, ok, p = _inpaint_verdict(c, img)
            oks["inpaint"].append(ok)
            psnrs["inpaint"].append(p)
            copies.append(exemplar_ssim(c, img))
        else:
            v = score_image(expectation_for(scene=c.scene), detect_objects(img))
            psnrs["inversion"].append(psnr(img, source_image(c)))
        verdicts.append(v)
    if psnrs["inversion"]:
        metrics["inversion_psnr"] = mean_ci(psnrs["inversion"])
    if oks["swap"]:
        metrics["edit_success"] = rate(sum(oks["swap"]), len(oks["swap"]))
        metrics["kept_psnr"] = mean_ci(psnrs["swap"])
    if oks["inpaint"]:
        metrics["inpaint_outside_psnr"] = mean_ci(psnrs["inpaint"])
        metrics["inpaint_inside_acc"] = rate(sum(oks["inpaint"]), len(oks["inpaint"]))
        metrics["exemplar_ssim"] = mean_ci(copies)
        metrics["paste_rate"] = rate(sum(x >= PASTE_SSIM for x in copies), len(copies))
    return RowScore(metrics, {}, verdicts)


def panel(case: Case, image: np.ndarray, verdict: ImageScore) -> Panel:
    """source | (mask) | output | target spec | judge overlay."""
    from mmsynth.evaluate.overlay import draw_verdict

    zoom = max(1, 128 // image.shape[0])
    overlay = draw_verdict(image, verdict, zoom=zoom)
    overlay = overlay[overlay.shape[0] - image.shape[0] * zoom:]
    tiles: Panel = [("source", source_image(case))]
    if case.mask is not None:
        tiles.append(("mask", mask_array(case).astype(np.uint8) * 255))
    tiles += [("output", image), ("target", case.render()), ("judge", overlay)]
    return tiles


inpaint, inpaint_batch = inpainter(inpaint_controls)
inpaint_guided, inpaint_guided_batch = inpainter(inpaint_guided_controls)
inpaint_layout, inpaint_layout_batch = inpainter(inpaint_layout_controls)
paint_by_example_batch = batched(lambda c: "", paint_by_example_controls)  # the exemplar alone conditions it


def _rows() -> dict[str, Row]:
    gt = Row("ground_truth", "reference", "renders of the edited scene specs (the ceiling)", ground_truth,
             needs=lambda c: [], categories=("swap", "inpaint"), uses_model=False)  # inversion: source == target
    rows = [gt, Row("regenerate", "reference", "the target prompt from fresh noise (keeps nothing of the source)",
                    text_to_image, generate_batch=text_to_image_batch, needs=lambda c: ["text"],
                    sweepable=SAMPLER_SETTINGS)]  # fmt: skip
    for sched in INVERSION_SCHEDULERS:
        name = "inversion" if sched == "ddim" else f"inversion_{sched}"
        rows.append(Row(name, "method", f"DDIM inversion ({INVERSION_STEPS} steps), reconstructed with {sched}",
                        inversion(sched), generate_batch=inversion_batch(sched), categories=("inversion",),
                        params={"steps": INVERSION_STEPS, "cfg": DEFAULT_INVERSION_CFG},
                        sweepable=("cfg", "steps")))  # fmt: skip
    rows.append(Row("inversion_null_text", "method", f"null-text inversion ({INVERSION_STEPS} steps, "
                    f"{NULL_TEXT_STEPS} Adam steps each), rebuilt at cfg {DEFAULT_CFG:g}",
                    lambda ctx, case: null_text_batch(ctx, [case])[0], generate_batch=null_text_batch,
                    categories=("inversion",),
                    params={"steps": INVERSION_STEPS, "cfg": DEFAULT_CFG, "null_text": NULL_TEXT_STEPS},
                    sweepable=("cfg", "steps", "null_text")))  # fmt: skip
    rows += [
        Row("swap", "method", "prompt-swap edit of the inverted source (negative-prompt inversion)", swap,
            generate_batch=swap_batch, categories=("swap",), params={"steps": EDIT_STEPS},
            sweepable=SWAP_SETTINGS),
        Row("swap_attention", "method", "prompt-swap edit replaying the source's self-attention for half the steps",
            swap, generate_batch=swap_batch, categories=("swap",), params={"steps": EDIT_STEPS, "keep_attention": 0.5},
            sweepable=SWAP_SETTINGS),
        Row("swap_partial", "method", "prompt-swap edit from a partial inversion (half the steps inverted and "
            "edited)", swap, generate_batch=swap_batch, categories=("swap",),
            params={"steps": EDIT_STEPS, "strength": SWAP_STRENGTH},
            sweepable=SWAP_SETTINGS),
        Row("swap_recolour", "method", "swap_partial + recolour guidance: the new colour drawn into the old "
            f"colour's pixels ({RECOLOUR_STEPS} backward steps of the region guide, confined there)", swap,
            generate_batch=swap_batch, categories=("swap",),
            params={"steps": EDIT_STEPS, "strength": SWAP_STRENGTH, "recolour": RECOLOUR_STEPS},
            sweepable=SWAP_SETTINGS),
        Row("img2img", "method", "SDEdit of the source under the edited prompt", img2img,
            generate_batch=batched(lambda c: c.prompt, img2img_controls), categories=("swap",),
            needs=lambda c: ["img2img"], params={"strength": 0.6}, sweepable=("strength", *SAMPLER_SETTINGS)),
        Row("inpaint", "method", "blended-latent inpainting of the mask, known pixels pasted back", inpaint,
            generate_batch=inpaint_batch, categories=("inpaint",), sweepable=INPAINT_SETTINGS),
        Row("inpaint_unet", "method", "the bundle's inpainting UNet (mask + masked-image latents as input "
            "channels), blended and pasted back", inpaint, generate_batch=inpaint_batch, categories=("inpaint",),
            needs=lambda c: ["inpainting_unet"], params={"inpainting_unet": 1}, sweepable=INPAINT_SETTINGS),
        Row("inpaint_resample", "method", f"inpainting with RePaint-style resampling ({INPAINT_RESAMPLE} passes "
            "per step)", inpaint, generate_batch=inpaint_batch, categories=("inpaint",),
            params={"resample": INPAINT_RESAMPLE}, sweepable=INPAINT_SETTINGS),
        Row("inpaint_guided", "method", "inpainting + the region guide drawing the new colour into the mask",
            inpaint_guided, generate_batch=inpaint_guided_batch, categories=("inpaint",),
            params={"s0": 0.0, "m": 10, "lr": 0.1}, sweepable=("s0", "m", "lr", *INPAINT_SETTINGS)),
        Row("inpaint_layout", "method", "resampled inpainting + the new object's cross-attention moved into the "
            "mask's box (forward layout guidance)", inpaint_layout, generate_batch=inpaint_layout_batch,
            categories=("inpaint",), params={"resample": INPAINT_RESAMPLE, "layout_strength": LAYOUT_STRENGTH},
            sweepable=INPAINT_SETTINGS),
        Row("inpaint_latent_only", "method", "blended-latent inpainting without the pixel paste-back", inpaint,
            generate_batch=inpaint_batch, categories=("inpaint",), params={"paste": 0}, sweepable=INPAINT_SETTINGS),
        Row("paint_by_example", "method", "Paint-by-Example: the new object's image (alone, turned) painted into the "
            "mask with no prompt (the bundle's paint_by_example components), kept pixels pasted back",
            lambda ctx, c: paint_by_example_batch(ctx, [c])[0], generate_batch=paint_by_example_batch,
            categories=("inpaint",), needs=lambda c: ["paint_by_example"], params={"paste": 1},
            sweepable=("paste", *SAMPLER_SETTINGS)),
    ]  # fmt: skip
    return {r.name: r for r in rows}


SUITE = register_suite(
    Suite(
        name="edit",
        description="inversion, prompt-swap editing, image-to-image and inpainting of test renders",
        make_cases=make_cases,
        score=score,
        panel=panel,
        check=check,
        headline="edit_success",
        sweep_metrics=("inversion_psnr", "kept_psnr", "inpaint_inside_acc"),
        cost_baseline="regenerate",
        default_n=200,
        quick_n=3,
        rows=_rows(),
    )
)
