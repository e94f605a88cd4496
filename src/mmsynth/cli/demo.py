"""`mmsynth demo`: a one-minute tour on a laptop CPU, written to one folder of pictures.

Sections: the dataset and its exact conditions, every annotator on one scene, the judge's verdicts on
clean and degraded renders, and (when the zoo is present) text-to-image samples next to the judge's
verdicts, the spatial controls the model carries (condition | prompt alone | controlled | scene), the layout
methods on the same boxes (and one planned prompt), then guidance
and editing (unguided | guided | target; source | inverted reconstruction | edit;
source | mask | inpainted), made by the benchmark's own rows on its cases. Each later capability adds its
section here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmsynth.cli.arguments import positive_int
from mmsynth.cli.sampling_options import add_sampling_arguments, sampling_kwargs
from mmsynth.data.scene import Scene
from mmsynth.io import atomic_dir, check_output_dir, save_image, write_text
from mmsynth.viz import colorize_labels, grid, label, upscale

SAMPLING_OPTIONS = ("steps", "cfg")
DEMO_PROMPTS = (
    "a red circle",
    "a large blue square",
    "three green stars",
    "a yellow triangle left of a purple cross",
    "an orange star above a cyan circle",
    "two pink squares and a blue triangle",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a one-minute tour: dataset, annotators, judge, text-to-image",
                       description="Write a showcase of mmsynth into one folder (PNG grids + summary.md).")  # fmt: skip
    p.add_argument("--out", "-o", default="demo", help="output folder (default: demo/; must be absent or empty "
                   "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out, replacing only the files the demo writes")
    p.add_argument("--model", default=None, help="text-to-image bundle (default: the shipped zoo models/shapes-v1; "
                   "without it the demo skips its model sections)")
    p.add_argument("--seeds", type=positive_int, default=4,
                   help="images per prompt in the text-to-image section (default 4)")
    add_sampling_arguments(p, SAMPLING_OPTIONS)
    p.set_defaults(func=run)


def _dataset_section(out: Path) -> str:
    from mmsynth.data.show import dataset_grid

    save_image(dataset_grid("train", 6, zoom=2), out / "dataset.png")
    return (
        "## Dataset\n![dataset](dataset.png)\n\n"
        "Each row: a Shapes scene, its exact semantic, colour, depth and edge maps.\n"
    )


def _annotator_section(out: Path) -> str:
    from mmsynth.annotate import from_scene, list_annotators
    from mmsynth.data import sample_scene

    scene = sample_scene("test", 11)
    tiles = [label(_render(scene), "image", 14)]
    for spec in list_annotators():
        if spec.output == "vector":
            continue
        m = from_scene(spec.name, scene, 128)
        if spec.name == "segmentation":
            m = colorize_labels(m)
        tiles.append(label(m, spec.name, 14))
    save_image(grid(tiles, cols=7), out / "annotators.png")
    return (
        "## Annotators\n![annotators](annotators.png)\n\n"
        "Every condition extractor on one test scene (depth and segmentation exact from the spec).\n"
    )


def _render(scene: Scene) -> np.ndarray:
    from mmsynth.data import render

    return render(scene, 128)


def _judge_section(out: Path) -> str:
    from mmsynth.data import captions, render, sample_scene
    from mmsynth.evaluate import judge_image
    from mmsynth.evaluate.judge import degrade
    from mmsynth.evaluate.overlay import draw_verdict

    tiles, passed = [], [0, 0]
    for i in range(8):
        scene = sample_scene("test", i)
        img = render(scene, 64)
        prompt = captions(scene, 1)[0]
        for k, (name, im) in enumerate((("clean", img), ("degraded", degrade(img, seed=i)))):
            score = judge_image(im, prompt=prompt)
            passed[k] += score.passed
            tiles.append(draw_verdict(im, score, zoom=3, title=f"{name}: {'PASS' if score.passed else 'FAIL'}"))
    save_image(grid(tiles, cols=4), out / "judge.png")
    return (
        "## The judge\n![judge](judge.png)\n\nThe judge reads objects back out of pixels (green: matches the "
        f"caption, red: does not). Clean renders passed {passed[0]}/8, degraded (noise 10/255, blur 1) {passed[1]}/8.\n"
    )


def _t2i_section(out: Path, args: argparse.Namespace, bundle: Any) -> str:
    from mmsynth.evaluate import judge_image
    from mmsynth.evaluate.overlay import draw_verdict
    from mmsynth.sample import GenerationRequest, sample

    rows, n_pass, n_all = [], 0, 0
    for p_i, prompt in enumerate(DEMO_PROMPTS):
        req = GenerationRequest(prompt=prompt, n=args.seeds, seed=1000 * p_i, **sampling_kwargs(args))
        result = sample(bundle, req, progress=False)
        tiles = []
        for img in result.images:
            score = judge_image(img, prompt=prompt)
            n_pass += score.passed
            n_all += 1
            tiles.append(draw_verdict(img, score, zoom=2))
        rows.append(label(grid(tiles, cols=len(tiles)), prompt, 14))
    save_image(grid(rows, cols=1), out / "t2i.png")
    return (
        "## Text to image\n![t2i](t2i.png)\n\n"
        f"{req.steps} DDIM steps, CFG {req.cfg}: {n_pass}/{n_all} images pass the judge.\n"
    )


# the bundle's inpainting UNet when it has one, else blended latents with resampling (any text-to-image bundle)
INPAINT_ROWS = ("inpaint_unet", "inpaint_resample")
GUIDANCE_EDIT_ROWS = (  # (suite, case category, [(title, row or rows by preference)]): one line per case
    ("guidance", "palette", [("unguided", "unguided"), ("palette guide", "palette"), ("target", "ground_truth")]),
    ("guidance", "box", [("unguided", "unguided"), ("box guide", "box"), ("target", "ground_truth")]),
    ("edit", "inversion", [("source", "ground_truth"), ("inverted + rebuilt", "inversion")]),
    ("edit", "swap", [("source", None), ("swap + recolour", "swap_recolour"), ("target", "ground_truth")]),
    ("edit", "inpaint", [("source", None), ("mask", "mask"), ("inpainted", INPAINT_ROWS), ("target", "ground_truth")]),
)


def _guidance_edit_section(out: Path, args: argparse.Namespace, bundle: Any) -> str:
    """Two cases per line of GUIDANCE_EDIT_ROWS, each drawn by the bench row that scores that method."""
    import dataclasses

    from mmsynth.evaluate.bench import RunContext, SamplerSettings, generate_shard, get_suite, make_cases
    from mmsynth.evaluate.bench.edit_suite import mask_array, source_image

    sampling = sampling_kwargs(args)
    ctx = RunContext(bundle_obj=bundle, sampler=SamplerSettings(**sampling))
    caps = ctx.capabilities()
    lines = []
    for suite_name, category, columns in GUIDANCE_EDIT_ROWS:
        suite = get_suite(suite_name)
        cases = [c for c in make_cases(suite_name, 2, seed=1) if c.category == category]
        for case in cases:
            tiles = []
            for title, rows in columns:
                row_name = rows if not isinstance(rows, tuple) else next(
                    r for r in rows if all(n in caps for n in suite.rows[r].requirements(case)))
                if row_name is None:
                    img = source_image(case)
                elif row_name == "mask":
                    img = np.repeat(mask_array(case)[..., None].astype(np.uint8) * 255, 3, axis=2)
                elif row_name == "ground_truth":
                    img = case.render()
                else:  # the demo's step count for every row (the bench runs inversion and edits at 50)
                    row = dataclasses.replace(suite.rows[row_name], overrides={"steps": sampling["steps"]})
                    img = generate_shard(ctx, row, [case])[0][1]
                tiles.append(label(upscale(img, 2), title, 14))
            lines.append(label(grid(tiles, cols=len(tiles)), case.prompt, 14))
    save_image(grid(lines, cols=1), out / "guidance_edit.png")
    how_inpainted = ("the bundle's inpainting UNet" if "inpainting_unet" in caps
                     else "blended latents with RePaint-style resampling")  # fmt: skip
    return (
        "## Guidance and editing\n![guidance and editing](guidance_edit.png)\n\n"
        "Universal guidance towards a target palette and boxes (same prompt and seed as the unguided image), "
        "DDIM inversion and reconstruction, prompt-swap editing of a render inverted half way with recolour guidance, "
        f"and inpainting ({how_inpainted}), all through the one sampler at {sampling['steps']} steps. "
        "Measured: `mmsynth bench run --suite "
        "guidance,edit` (docs/bench.md).\n"
    )


CONTROL_CATEGORIES = ("canny", "segmentation", "depth", "sketch", "palette", "multi")


def _controls_section(out: Path, args: argparse.Namespace, bundle: Any) -> str:
    """One control-suite case per spatial control the bundle carries: condition | the prompt alone | the prompt
    with the control (judge overlay) | the scene's render; and one multi-control line (canny + palette)."""
    from mmsynth.evaluate import judge_image
    from mmsynth.evaluate.bench import RunContext, SamplerSettings, generate_shard, get_suite, make_cases
    from mmsynth.evaluate.bench.control_suite import COMPONENTS
    from mmsynth.evaluate.overlay import draw_verdict

    suite = get_suite("control")
    ctx = RunContext(bundle_obj=bundle, sampler=SamplerSettings(**sampling_kwargs(args)))
    caps = ctx.capabilities()
    lines, shown = [], []
    for case in make_cases("control", 1, seed=1):
        if case.category not in CONTROL_CATEGORIES:
            continue
        row_name = "multi" if case.category == "multi" else COMPONENTS[case.controls[0].kind]
        row = suite.rows[row_name]
        if not all(n in caps for n in row.requirements(case)):
            continue
        condition = suite.panel(case, case.render(), judge_image(case.render(), prompt=case.prompt))[0][1]
        plain = generate_shard(ctx, suite.rows["no_control"], [case])[0][1]
        controlled = generate_shard(ctx, row, [case])[0][1]
        score = judge_image(controlled, prompt=case.prompt)
        tiles = [label(upscale(condition, 2), f"condition: {case.controls[0].kind}", 14),
                 label(upscale(plain, 2), "prompt alone", 14),
                 label(draw_verdict(controlled, score, zoom=2), row_name, 14),
                 label(upscale(case.render(), 2), "scene", 14)]  # fmt: skip
        lines.append(label(grid(tiles, cols=len(tiles)), case.prompt, 14))
        shown.append(row_name)
    if not lines:
        return ("## Spatial controls\nThis model carries no ControlNet or T2I-Adapter components (`mmsynth zoo ship "
                "control` adds them); skipped.\n")
    save_image(grid(lines, cols=1), out / "controls.png")
    return (
        "## Spatial controls\n![controls](controls.png)\n\n"
        f"The model's controls ({', '.join(shown)}) on test scenes never trained on: the condition, the same prompt "
        "and seed without and with the control (boxes: the judge), and the scene the condition came from. "
        "Measured: `mmsynth bench run --suite control` (docs/controls.md).\n"
    )


LAYOUT_ROWS = ("no_control", "forward", "backward", "regional", "gligen", "gligen_backward")
PLANNED_PROMPT = "two red circles left of a blue square"


def _layout_section(out: Path, args: argparse.Namespace, bundle: Any) -> str:
    """Two layout-suite cases: the layout drawn | each layout method's output with the judge's boxes (green: the
    right object in its box); then one prompt planned into boxes (Shapes planner) and drawn by GLIGEN (or backward
    guidance when the model has no GLIGEN layers)."""
    from mmsynth.annotate import annotate
    from mmsynth.evaluate.bench import RunContext, SamplerSettings, generate_shard, get_suite, make_cases
    from mmsynth.evaluate.bench.layout_suite import draw_detections, judge
    from mmsynth.sample import GenerationRequest, sample
    from mmsynth.sample.layout import layout_method_control
    from mmsynth.sample.planning import ShapesPlanner

    suite = get_suite("layout")
    ctx = RunContext(bundle_obj=bundle, sampler=SamplerSettings(**sampling_kwargs(args)))
    caps = ctx.capabilities()
    lines, shown = [], []
    for case in [c for c in make_cases("layout", 4, seed=1) if len(c.extra["layout"]["objects"]) in (2, 3)]:
        verdict = judge(case, case.render())
        h = case.resolution
        tiles = [label(annotate("layout", np.zeros((2 * h, 2 * h, 3), np.uint8), boxes=verdict.layout.boxes,
                                phrases=verdict.layout.phrases), "layout", 14)]  # fmt: skip
        for name in LAYOUT_ROWS:
            row = suite.rows.get(name)
            if row is None or not all(n in caps for n in row.requirements(case)):
                continue
            image = generate_shard(ctx, row, [case])[0][1]
            v = judge(case, image)
            tiles.append(label(draw_detections(image, v, 2), f"{name} {sum(v.hits)}/{len(v.hits)}", 14))
            if name not in shown:
                shown.append(name)
        lines.append(label(grid(tiles, cols=len(tiles)), case.prompt, 14))
    method = "gligen" if "gligen" in caps else "backward"
    planned = ShapesPlanner().plan(PLANNED_PROMPT, seed=1)
    request = GenerationRequest(prompt=PLANNED_PROMPT, seed=1, n=1, **sampling_kwargs(args))
    image = sample(bundle, request, [layout_method_control(method, planned.boxes, planned.phrases)],
                   progress=False).images[0]
    h = image.shape[0]
    plan_tiles = [label(annotate("layout", np.zeros((2 * h, 2 * h, 3), np.uint8), boxes=planned.boxes,
                                 phrases=planned.phrases), "planned layout", 14),
                  label(upscale(image, 2), f"{method}", 14)]  # fmt: skip
    lines.append(label(grid(plan_tiles, cols=len(plan_tiles)), f"planned: {PLANNED_PROMPT}", 14))
    save_image(grid(lines, cols=1), out / "layout.png")
    return (
        "## Layout\n![layout](layout.png)\n\n"
        f"Boxes and phrases drawn by each layout method the model can run ({', '.join(shown)}): the layout, then each "
        "output with the judge's detections (green: the right colour and shape in its box). Last line: a prompt "
        f"planned into boxes by the Shapes planner (`--plan shapes`) and drawn by {method}. Measured: "
        "`mmsynth bench run --suite layout` and the t2i suite's `planned` rows (docs/layout.md).\n"
    )


def _exemplar_section(out: Path, args: argparse.Namespace, bundle: Any) -> str:
    """A Composer line (image A's sketch alone, then with image B's colours) and a Paint-by-Example line (scene |
    mask | exemplar | painted), each drawn when the model carries its components."""
    import dataclasses

    from PIL import Image

    from mmsynth.evaluate.bench import make_cases
    from mmsynth.evaluate.bench.edit_suite import exemplar_image, mask_array, source_image
    from mmsynth.sample import Composer, GenerationRequest, PaintByExample, sample
    from mmsynth.sample.composer import COMPOSER, COMPOSER_UNET, decompose

    extras = getattr(bundle, "extras", {})
    kwargs = {k: v for k, v in sampling_kwargs(args).items() if k not in ("prompt", "n", "seed")}
    lines, made = [], []
    if COMPOSER in extras and COMPOSER_UNET in extras:
        a, b = (dataclasses.replace(c, resolution=bundle.resolution) for c in make_cases("t2i", 2, seed=1)[:2])
        reps_a, reps_b = decompose(bundle, a.render(), ["sketch"]), decompose(bundle, b.render(), ["histogram"])
        request = GenerationRequest(prompt=a.prompt, n=1, seed=1, **kwargs)
        alone = sample(bundle, request, [Composer(conditions=reps_a)], progress=False).images[0]
        mixed = sample(bundle, request, [Composer(conditions={**reps_a, **reps_b})], progress=False).images[0]
        tiles = [label(upscale(a.render(), 2), "A", 14), label(upscale(reps_a["sketch"], 2), "A's sketch", 14),
                 label(upscale(alone, 2), "from the sketch", 14), label(upscale(mixed, 2), "+ B's colours", 14),
                 label(upscale(b.render(), 2), "B", 14)]  # fmt: skip
        lines.append(label(grid(tiles, cols=len(tiles)), f"Composer: {a.prompt}", 14))
        made.append("Composer (`mmsynth compose`)")
    if all(name in extras for name in ("paint_by_example_unet", "paint_by_example_encoder")):
        case = next(dataclasses.replace(c, resolution=bundle.resolution) for c in make_cases("edit", 1, seed=1)
                    if c.category == "inpaint")
        scene, mask, exemplar = source_image(case), mask_array(case), exemplar_image(case)
        request = GenerationRequest(n=1, seed=1, **kwargs)
        painted = sample(bundle, request, [PaintByExample(image=scene, mask=mask.astype(np.uint8) * 255,
                                                          exemplar=exemplar)], progress=False).images[0]
        shown_mask = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
        big = np.asarray(Image.fromarray(exemplar).resize(scene.shape[:2][::-1]))
        tiles = [label(upscale(scene, 2), "scene", 14), label(upscale(shown_mask, 2), "mask", 14),
                 label(upscale(big, 2), "exemplar", 14), label(upscale(painted, 2), "painted", 14)]  # fmt: skip
        lines.append(label(grid(tiles, cols=len(tiles)), "Paint-by-Example (generate --exemplar)", 14))
        made.append("Paint-by-Example (`generate --exemplar`)")
    if not lines:
        return ("## Exemplars and recombination\nThis model carries no Composer or Paint-by-Example components "
                "(`mmsynth train composer`, `mmsynth train paint-by-example`); skipped.\n")
    save_image(grid(lines, cols=1), out / "exemplars.png")
    return ("## Exemplars and recombination\n![exemplars](exemplars.png)\n\n"
            f"{' and '.join(made)} on test scenes never trained on (docs/editing.md).\n")


def run(args: argparse.Namespace) -> int:
    from mmsynth.errors import InputError
    from mmsynth.models.bundle import Bundle
    from mmsynth.models.shipped import resolve_model

    out = check_output_dir(args.out, overwrite=args.overwrite)
    bundle, skipped = None, None
    try:  # before any work: a model the user named must exist; only the default zoo may be missing
        bundle = Bundle.from_pretrained(resolve_model(args.model))
    except InputError as exc:
        if args.model is not None:
            raise
        skipped = f"## Text to image, guidance and editing\nSkipped: {exc}\n"
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        parts = ["# mmsynth demo\n"]
        for name, fn in (("dataset", _dataset_section), ("annotators", _annotator_section), ("judge", _judge_section)):
            t = time.perf_counter()
            parts.append(fn(tmp))
            print(f"demo: {name} ({time.perf_counter() - t:.1f} s)")
        if bundle is None:
            parts.append(skipped)
        else:
            for name, section in (("text to image", _t2i_section), ("spatial controls", _controls_section),
                                  ("layout", _layout_section), ("guidance and editing", _guidance_edit_section),
                                  ("exemplars", _exemplar_section)):
                t = time.perf_counter()
                parts.append(section(tmp, args, bundle))
                print(f"demo: {name} ({time.perf_counter() - t:.1f} s)")
        write_text("\n".join(parts), tmp / "summary.md")
    print(f"wrote {out}/ (summary.md and PNG grids)")
    return 0
