"""`mmsynth invert`: DDIM-invert an image to its x_T (a .safetensors file with the request that made it).

The file holds the latent tensor `latents` (1 x C x h x w) and, in its metadata, the inversion request
as JSON (the source image embedded), so the inversion itself replays. Reconstruct with
`mmsynth generate --latents x_T.safetensors --prompt ... --cfg 1`, or here with `--reconstruct OUT.png`.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from mmsynth.cli import model_options
from mmsynth.cli.arguments import limits_from_args, non_negative_float
from mmsynth.cli.sampling_options import add_run_arguments, add_sampling_arguments, sampling_kwargs
from mmsynth.errors import InputError
from mmsynth.io import check_output_file
from mmsynth.models.shipped import DEFAULT_MODEL
from mmsynth.sample.request import DEFAULT_INVERSION_CFG, DEFAULT_INVERSION_STEPS, DEFAULT_SCHEDULER

SAMPLING_OPTIONS = ("prompt", "negative_prompt", "steps", "cfg")


def register(subparsers: Any) -> None:
    from mmsynth.sample.schedulers import scheduler_names

    p = subparsers.add_parser(
        "invert",
        help="DDIM-invert an image to its starting noise x_T (for reconstruction and editing)",
        description="Run the one sampler backwards (DDIMInverseScheduler) from IMAGE to x_T; writes a .safetensors "
        "file with the latents and the replayable inversion request.",
    )
    p.add_argument("image", help="the image to invert; its size must be a multiple of the model's VAE factor")
    p.add_argument("--out", required=True, help="output x_T file (.safetensors)")
    add_sampling_arguments(p, SAMPLING_OPTIONS, required=("prompt",),
                           defaults={"steps": DEFAULT_INVERSION_STEPS, "cfg": DEFAULT_INVERSION_CFG},
                           helps={"prompt": "the image's caption (the condition of the inversion)",
                                  "negative_prompt": "negative prompt (used only with --cfg > 1; default: empty)",
                                  "steps": "DDIM steps (default {default}; reconstruct with the same number)",
                                  "cfg": "guidance scale of the inversion (default {default}: plain DDIM)"})
    p.add_argument("--reconstruct", default=None, help="also write the reconstruction from x_T to this PNG and print "
                   "its PSNR against the input")
    p.add_argument("--reconstruct-cfg", type=non_negative_float, default=None,
                   help=f"with --reconstruct: guidance scale of the reconstruction (default {DEFAULT_INVERSION_CFG:g})")
    p.add_argument("--reconstruct-scheduler", default=None,
                   help=f"with --reconstruct: one of {', '.join(scheduler_names())} (default {DEFAULT_SCHEDULER})")
    p.add_argument("--negative-prompt-inversion", action="store_true",
                   help="with --reconstruct: reconstruct with the prompt as the negative prompt (keeps CFG > 1 "
                   "faithful)")
    add_run_arguments(p, "the files --out and --reconstruct name", images=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.fidelity import psnr
    from mmsynth.io import atomic_path, load_image, save_image
    from mmsynth.sample.inversion import invert, reconstruct
    from mmsynth.sample.latents_file import save_latents
    from mmsynth.sample.schedulers import check_scheduler_name

    out = check_output_file(args.out, "--out", suffixes=(".safetensors",), overwrite=args.overwrite)
    reconstruct_options = {"--reconstruct-cfg": args.reconstruct_cfg is not None,
                           "--reconstruct-scheduler": args.reconstruct_scheduler is not None,
                           "--negative-prompt-inversion": args.negative_prompt_inversion}  # fmt: skip
    if args.reconstruct is None:
        given = [name for name, on in reconstruct_options.items() if on]
        if given:
            raise InputError(f"{given[0]} needs --reconstruct OUT.png (it sets how the reconstruction is made)")
    else:
        rec_out = check_output_file(args.reconstruct, "--reconstruct", suffixes=(".png",), overwrite=args.overwrite)
        if rec_out.absolute() == out.absolute():
            raise InputError("--reconstruct must be another file than --out")
        check_scheduler_name(args.reconstruct_scheduler or DEFAULT_SCHEDULER, "--reconstruct-scheduler")
    image = load_image(args.image, "IMAGE")
    limits_from_args(args).check_size(*image.shape[:2], what=f"IMAGE '{args.image}': ")
    bundle = model_options.load_bundle(args)
    sampling = sampling_kwargs(args)
    result = invert(bundle, image, **sampling, progress=not args.quiet)
    result.request.model = args.model or DEFAULT_MODEL
    rec = None
    if args.reconstruct is not None:  # computed before anything is written: no partial outputs on error
        rec = reconstruct(bundle, result.latents, sampling["prompt"], steps=sampling["steps"],
                          cfg=DEFAULT_INVERSION_CFG if args.reconstruct_cfg is None else args.reconstruct_cfg,
                          scheduler=args.reconstruct_scheduler or DEFAULT_SCHEDULER,
                          negative_prompt_inversion=args.negative_prompt_inversion, progress=not args.quiet)
    with contextlib.ExitStack() as files:  # both files or neither: renamed into place only when both are written
        tmp = files.enter_context(atomic_path(out))
        save_latents(result.latents, tmp, result.request)
        if rec is not None:
            save_image(rec.images[0], files.enter_context(atomic_path(args.reconstruct)))
    print(f"wrote x_T {tuple(result.latents.shape)} to {out}")
    if rec is not None:
        print(f"wrote the reconstruction to {args.reconstruct}: PSNR {psnr(rec.images[0], image):.2f} dB vs the input")
    return 0
