"""Options that `mmsynth generate` (and `mmsynth edit`) share for inpainting, universal guidance, Attend-and-Excite
and x_T latents.

Not a command: generate.py adds these arguments with `add_arguments` and turns them into controls with
`controls_from_args` (built once; the sampler records them), so a guided, masked or inverted-latent generation is
one replayable request.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsynth.cli.arguments import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from mmsynth.errors import InputError
from mmsynth.io import parse_json

if TYPE_CHECKING:
    from mmsynth.sample.controls import Control

# argparse destinations these options fill (generate's --replay refuses them, like the other request options)
INPAINT_OPTIONS = ("mask", "feather", "resample", "resample_until", "jump_length", "unet")
GUIDE_OPTIONS = ("guide", "guide_target", "guide_text", "guide_params", "s0", "k", "m", "guide_lr", "guide_start",
                 "guide_end")
EXCITE_OPTIONS = ("excite", "excite_step", "excite_end")
OPTION_NAMES = ("latents", *INPAINT_OPTIONS, "exemplar", *GUIDE_OPTIONS, *EXCITE_OPTIONS)
# the shipped guides (mmsynth.sample.guides.GUIDES, checked equal in the tests), named here so that `--help`
# does not import torch
GUIDE_NAMES = ("box", "clip", "palette", "region")


def add_arguments(p: argparse.ArgumentParser, latents: bool = True) -> None:
    if latents:
        p.add_argument("--latents", default=None,
                       help="start from these latents (an x_T .safetensors written by `mmsynth invert`): "
                       "reconstruction")
    p.add_argument("--mask", default=None, help="inpaint: binary PNG, white = repaint, the size of --init-image (the "
                   "source); img2img is then used only if --strength is given")
    p.add_argument("--feather", type=non_negative_float, default=None,
                   help="inpaint seam width in pixels, inside the mask (default 2)")
    p.add_argument("--resample", type=positive_int, default=None,
                   help="inpaint: passes per step (RePaint-style resampling: the blended latent is re-noised and the "
                   "step redone, so the new content fits its surroundings; default 1 = off, e.g. 5)")
    p.add_argument("--resample-until", type=fraction, default=None,
                   help="inpaint: resample only the first fraction of the steps (default 1 = all, e.g. 0.5)")
    p.add_argument("--jump-length", type=positive_int, default=None,
                   help="inpaint: resample stretches of this many steps at once (RePaint's jumps: re-noised back "
                   "over the stretch and redone; default 1 = each step on its own)")
    p.add_argument("--unet", default=None, choices=("auto", "inpainting", "base"),
                   help="inpaint with which UNet: auto (default: the model's inpainting UNet, unet_inpainting/, when "
                   "it has one), inpainting (require it) or base (the text-to-image UNet, latent blending alone)")
    p.add_argument("--exemplar", default=None,
                   help="with --init-image and --mask: Paint-by-Example, paint this object's image into the masked "
                   "region (the model's paint_by_example_unet and _encoder; no prompt)")
    p.add_argument("--guide", default=None, help=f"universal guidance with a shipped guide: {', '.join(GUIDE_NAMES)}")
    p.add_argument("--guide-target", default=None, help="target image of the guide (palette: its colours; clip: "
                   "image-image similarity)")
    p.add_argument("--guide-text", default=None, help="clip guide: the text to move towards")
    p.add_argument("--guide-params", default=None,
                   help='more guide parameters as JSON, e.g. \'{"boxes": [[0.1, 0.1, 0.5, 0.5]], "phrases": '
                   '["a red circle"]}\' (box) or \'{"mask": "m.png", "color": "red"}\' (region)')
    p.add_argument("--s0", type=non_negative_float, default=None, help="forward guidance strength >= 0 (default 1)")
    p.add_argument("--k", type=positive_int, default=None, help="self-recurrence: passes per step >= 1 (default 1)")
    p.add_argument("--m", type=non_negative_int, default=None, help="backward guidance steps per step >= 0 (default 0)")
    p.add_argument("--guide-lr", type=positive_float, default=None, help="backward guidance Adam step (default 0.05)")
    p.add_argument("--guide-start", type=fraction, default=None, help="guidance from this fraction of the steps (0)")
    p.add_argument("--guide-end", type=fraction, default=None, help="guidance until this fraction of the steps (1)")
    p.add_argument("--excite", default=None, metavar="WORDS",
                   help="Attend-and-Excite: comma-separated words of the prompt whose objects must appear (e.g. "
                   "'cat,frog'), or 'auto' for the nouns of a Shapes caption's groups")
    p.add_argument("--excite-step", type=positive_float, default=None,
                   help="Attend-and-Excite step scale > 0 (default 20)")
    p.add_argument("--excite-end", type=fraction, default=None,
                   help="Attend-and-Excite until this fraction of the steps, in (0, 1] (default 0.5)")


def guide_control(args: argparse.Namespace) -> Control | None:
    """The universal-guidance control the options describe (None without --guide)."""
    from mmsynth.io import load_image
    from mmsynth.sample.controls import Schedule
    from mmsynth.sample.universal import UniversalGuidance

    given = [o for o in GUIDE_OPTIONS if o != "guide" and getattr(args, o, None) is not None]
    if args.guide is None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --guide (the loss to guide with)")
        return None
    params: dict[str, Any] = {}
    if args.guide_params is not None:
        params = parse_json(args.guide_params, "--guide-params")
        if not isinstance(params, dict):
            raise InputError("--guide-params must be a JSON object of the guide's parameters")
    for key in ("mask", "target", "image"):  # image paths inside the JSON: embed them, so the request replays
        if isinstance(params.get(key), str):
            params[key] = load_image(params[key], f"--guide-params {key}")
    if args.guide_target is not None:
        params["image" if args.guide == "clip" else "target"] = load_image(args.guide_target, "--guide-target")
    if args.guide_text is not None:
        params["text"] = args.guide_text
    options = {"s0": args.s0, "k": args.k, "m": args.m, "lr": args.guide_lr}
    schedule = Schedule(start=0.0 if args.guide_start is None else args.guide_start,
                        end=1.0 if args.guide_end is None else args.guide_end)
    return UniversalGuidance(guide=args.guide, params=params, schedule=schedule,
                             **{k: v for k, v in options.items() if v is not None})


def excite_control(args: argparse.Namespace) -> Control | None:
    """The Attend-and-Excite control the options describe (None without --excite)."""
    from mmsynth.sample.attend_excite import AttendExcite
    from mmsynth.sample.controls import Schedule

    words = getattr(args, "excite", None)
    given = [o for o in EXCITE_OPTIONS[1:] if getattr(args, o, None) is not None]
    if words is None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --excite (the words whose objects must appear)")
        return None
    tokens = None if words.strip() == "auto" else [w.strip() for w in words.split(",") if w.strip()]
    if tokens == []:
        raise InputError("--excite must name words of the prompt (comma-separated) or be 'auto'")
    end = 0.5 if args.excite_end is None else args.excite_end
    if not 0 < end <= 1:
        raise InputError(f"--excite-end must be in (0, 1] (a fraction of the steps), got {end}")
    kwargs = {} if args.excite_step is None else {"step_size": args.excite_step}
    return AttendExcite(tokens=tokens, schedule=Schedule(end=end), **kwargs)


def controls_from_args(args: argparse.Namespace, init_image: np.ndarray | None) -> list[Control]:
    """The controls for --latents, --mask (with the init image as the source), --guide and --excite, each built
    once from the arrays loaded here (no dict round trip: the sampler records them)."""
    from mmsynth.io import load_image
    from mmsynth.sample.inpaint import BlendedInpaint
    from mmsynth.sample.inversion import InitialLatents
    from mmsynth.sample.latents_file import load_latents

    controls: list[Control] = []
    if getattr(args, "latents", None) is not None:
        x, _ = load_latents(args.latents)
        controls.append(InitialLatents(latents=x.numpy()))
    exemplar = getattr(args, "exemplar", None)
    given = [o for o in (*INPAINT_OPTIONS[1:], "exemplar") if getattr(args, o, None) is not None]
    if given and args.mask is None:
        raise InputError(f"--{given[0].replace('_', '-')} needs --mask (it is an inpainting option)")
    if args.mask is not None:
        if init_image is None:
            raise InputError("--mask needs --init-image: the image whose masked (white) region is repainted")
        mask = load_image(args.mask, "--mask")
        kwargs = {o: getattr(args, o) for o in INPAINT_OPTIONS[1:] if getattr(args, o, None) is not None}
        if exemplar is None:
            controls.append(BlendedInpaint(image=init_image, mask=mask, **kwargs))
        elif "unet" in kwargs:
            raise InputError("--unet does not apply to --exemplar: Paint-by-Example uses the model's own "
                             "paint_by_example_unet")
        else:
            from mmsynth.sample.paint_by_example import PaintByExample

            controls.append(PaintByExample(image=init_image, mask=mask, exemplar=load_image(exemplar, "--exemplar"),
                                           **kwargs))
    for control in (guide_control(args), excite_control(args)):
        if control is not None:
            controls.append(control)
    return controls
