"""`mmsynth generate`: text (and controls) -> images, written with their requests so any image replays.

OUT/ after a run (the imagefolder exchange format that `mmsynth judge OUT` scores):
  images/0000.png ...      one PNG per image, its request inside (text chunks `mmsynth.request` and A1111's
                           `parameters`: `--replay images/0000.png` regenerates it)
  requests/0000.json ...   the request that reproduces that image alone (`--replay`)
  request.json             the whole batch's request
  grid.png                 all images in one picture
  metadata.jsonl           {"file_name": "images/0000.png", "prompt": ..., "request": {...}} per image
                           (with --best-of, also "best_of": the candidate kept and every candidate's CLIP distance)
  layout.json, layout.png  with a layout (--layout, --box, --plan): the layout used (a plan's output), drawn
The folder is built beside OUT and renamed into place, so a failed run leaves nothing behind.
With --prompt-file, one request per prompt, split across the processes of an `accelerate launch` (docs/multi-gpu.md);
request.json then holds {"prompt_file": ..., "requests": [one per prompt]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsynth.cli import control_options, guidance_options, layout_options, model_options, prompt_file
from mmsynth.cli.arguments import finite_float, limits_from_args
from mmsynth.cli.model_options import Lora
from mmsynth.cli.sampling_options import add_run_arguments, add_sampling_arguments, given_flags, sampling_kwargs
from mmsynth.errors import InputError
from mmsynth.io import atomic_dir, check_output_dir, read_json_file
from mmsynth.models.shipped import DEFAULT_MODEL, resolve_model
from mmsynth.models.sources import model_hash
from mmsynth.sample.png_metadata import png_info, read_request
from mmsynth.sample.request import DEFAULT_STRENGTH
from mmsynth.viz import grid

if TYPE_CHECKING:
    from mmsynth.models import Bundle
    from mmsynth.sample import Control, GenerationRequest, SampleResult

SAMPLING_OPTIONS = ("prompt", "negative_prompt", "n", "seed", "steps", "cfg", "scheduler", "height", "width", "eta",
                    "best_of")
log = logging.getLogger(__name__)
IMAGES = 4  # images per call when -n is not given
# Options that describe the generation itself besides the sampling options; --replay takes all of them from the file.
_REQUEST_OPTIONS = ("init_image", "strength", "lora", *guidance_options.OPTION_NAMES, *control_options.OPTION_NAMES,
                    *layout_options.OPTION_NAMES)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images from a prompt (and controls) with a model bundle",
        description="Generate images with the one sampler; writes PNGs, a grid, a replayable request per image\n"
        "and metadata.jsonl (scored by `mmsynth judge OUT`).",
        epilog=control_options.help_text(DEFAULT_MODEL) + "\n\n" + layout_options.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_arguments(p, SAMPLING_OPTIONS, defaults={"n": IMAGES})
    p.add_argument("--init-image", default=None, help="image-to-image (SDEdit): start from this image")
    p.add_argument("--strength", type=finite_float, default=None,
                   help=f"img2img strength in (0, 1] (default {DEFAULT_STRENGTH:g})")
    guidance_options.add_arguments(p)  # --latents, --mask, --guide ... (inpainting, universal guidance, x_T)
    control_options.add_arguments(p)  # --control SPEC (ControlNet, T2I-Adapter)
    layout_options.add_arguments(p)  # --layout, --box, --plan, --layout-method (GLIGEN, layout guidance, regions)
    p.add_argument("--replay", default=None,
                   help="a request .json or a PNG written by a previous run (its request is inside): regenerate it "
                   "exactly")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help=prompt_file.HELP)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    add_run_arguments(p, "an existing non-empty --out: only the files generate writes are replaced")
    p.add_argument("--eval", action="store_true", help="score the outputs with the judge afterwards")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> tuple[GenerationRequest, list[Control]]:
    """The GenerationRequest the arguments describe and its controls, each built once (images decoded once).

    From --replay the request keeps the file's control dicts (they are the batch's record); from the options its
    `controls` stay empty: the sampler records the built controls (`sample_built`). A layout the options give is
    kept in `args.layout_used` (written beside the images).
    """
    from mmsynth.sample import GenerationRequest, Img2Img

    if args.replay:
        given = given_flags(args) + [f"--{o.replace('_', '-')}" for o in _REQUEST_OPTIONS
                                     if getattr(args, o) is not None]
        if given:
            given_text = ", ".join(given)
            raise InputError(f"--replay takes the whole request from its file; do not combine it with {given_text}")
        data = (read_request(args.replay) if Path(args.replay).suffix.lower() == ".png"
                else read_json_file(args.replay, "--replay"))
        request, controls = GenerationRequest.load(data, where=f"--replay '{args.replay}'",
                                                   limits=limits_from_args(args))
        if args.model is not None:
            request.model = args.model
        if args.dtype is None:  # the precision it was made in (fp32 before requests recorded it)
            args.dtype = request.dtype or "fp32"
        return request, controls
    if args.strength is not None and args.init_image is None:
        raise InputError("--strength needs --init-image (it is the image-to-image strength)")
    controls: list[Control] = []
    image = None
    if args.init_image is not None:
        from mmsynth.io import load_image

        image = load_image(args.init_image, "--init-image")
        if args.mask is None or args.strength is not None:  # with --mask the image is the inpainting source
            strength = DEFAULT_STRENGTH if args.strength is None else args.strength
            controls.append(Img2Img(image=image, strength=strength))
    controls += guidance_options.controls_from_args(args, image)
    if args.control:
        controls += control_options.controls_from_args(args, str(resolve_model(args.model or DEFAULT_MODEL)))
    kwargs = sampling_kwargs(args)
    layout_controls, args.layout_used = layout_options.controls_from_args(args, kwargs["prompt"] or "",
                                                                          kwargs["seed"])
    if args.layout_used is not None and not kwargs["prompt"]:  # a layout file's own prompt
        kwargs["prompt"] = args.layout_used.prompt
    controls += layout_controls
    loras = [Lora.parse(spec) for spec in args.lora or []]
    request = GenerationRequest(**kwargs, model=args.model or DEFAULT_MODEL,
                                loras=[{"path": x.path, "scale": x.scale} for x in loras])
    request.validate(limits_from_args(args))
    return request, controls


def sample_built(bundle: Bundle, request: GenerationRequest, controls: list[Control], progress: bool) -> SampleResult:
    """Sample with controls built once: the request's control dicts are left out, so that the sampler neither builds
    nor decodes them again; it records the controls (one `to_dict` each) in the requests it returns."""
    from mmsynth.sample import sample

    return sample(bundle, dataclasses.replace(request, controls=[]), controls, progress=progress)


def recorded(request: GenerationRequest, result: SampleResult) -> GenerationRequest:
    """The whole batch's replayable request: a replayed file's own control dicts, else those the sampler recorded
    for image 0 (the CLI gives no control a per-image list, so image 0's control dicts are every image's)."""
    first = result.requests[0]
    return dataclasses.replace(request, controls=request.controls or first.controls, height=first.height,
                               width=first.width)


def write_outputs(out: Path, result: Any, request: Any, overwrite: bool, layout: Any = None) -> None:
    """Write every file into a temp folder beside `out`, then rename it into place (nothing half-written)."""
    from PIL import Image

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if layout is not None:
            from mmsynth.annotate.layout import layout as draw_layout

            (tmp / "layout.json").write_text(json.dumps(layout.to_dict(), indent=2) + "\n", encoding="utf-8")
            side = max(256, int(result.images.shape[1]))
            drawing = draw_layout(np.zeros((side, side, 3), np.uint8), layout.boxes, layout.phrases, 2, True, "black")
            Image.fromarray(drawing).save(tmp / "layout.png")
        (tmp / "images").mkdir()
        (tmp / "requests").mkdir()
        rows = []
        for i, (img, req) in enumerate(zip(result.images, result.requests)):
            name = f"{i:04d}"
            Image.fromarray(img).save(tmp / "images" / f"{name}.png", pnginfo=png_info(req))
            (tmp / "requests" / f"{name}.json").write_text(req.to_json() + "\n", encoding="utf-8")
            row = {"file_name": f"images/{name}.png", "prompt": req.prompt, "seed": req.seed, "request": req.to_dict()}
            if result.selection is not None:  # best-of-K: which candidate was kept, and why
                row["best_of"] = result.selection[i]
            rows.append(row)
        cols = math.ceil(math.sqrt(len(result.images)))
        Image.fromarray(grid(list(result.images), cols=cols)).save(tmp / "grid.png")
        (tmp / "request.json").write_text(request.to_json() + "\n", encoding="utf-8")
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_eval(out: Path) -> None:
    try:
        from mmsynth.evaluate import judge_folder  # type: ignore[attr-defined]
    except ImportError:
        print("--eval: the judge (mmsynth.evaluate.judge_folder) is not available in this install", file=sys.stderr)
        return
    report = judge_folder(out, progress=False)
    print(report.table() if hasattr(report, "table") else report)


def run(args: argparse.Namespace) -> int:
    if args.prompt_file is not None:
        from mmsynth.cli.prompt_file import run_prompt_file

        return run_prompt_file(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("under `accelerate launch` generate splits a --prompt-file across the processes; a single "
                         "--prompt or --replay runs in one process (start it without accelerate)")
    out = check_output_dir(args.out, overwrite=args.overwrite)
    request, controls = build_request(args)
    source = resolve_model(request.model or DEFAULT_MODEL)
    recorded_hash, request.model_hash = request.model_hash, model_hash(source)
    if recorded_hash is not None and recorded_hash != request.model_hash:
        log.warning("the model at '%s' has hash %s, not the %s the request records: the images may differ",
                    source, request.model_hash, recorded_hash)
    bundle = model_options.load_bundle(args, str(source), [Lora.checked(x["path"], x["scale"]) for x in request.loras])
    model_options.check_lora_reach(bundle, controls, request.loras)
    request.dtype = model_options.dtype_name(bundle.dtype)
    result = sample_built(bundle, request, controls, progress=not args.quiet)
    write_outputs(out, result, recorded(request, result), args.overwrite, getattr(args, "layout_used", None))
    print(f"wrote {len(result.images)} image(s), grid.png, requests and metadata.jsonl to {out}")
    if args.eval:
        run_eval(out)
    return 0

