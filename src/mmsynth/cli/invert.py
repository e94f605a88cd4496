"""`mmsynth invert`: DDIM-invert an image to its x_T (a .safetensors file with the request that made it).

The file holds the latent tensor `latents` (1 x C x h x w) and, in its metadata, the inversion request
as JSON (the source image embedded), so the inversion itself replays. Reconstruct with
`mmsynth generate --latents x_T.safetensors --prompt ... --cfg 1`, or here with `--reconstruct OUT.png`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmsynth.errors import InputError
from mmsynth.models.shipped import DEFAULT_MODEL, resolve_model


def register(subparsers: Any) -> None:
    from mmsynth.sample.schedulers import scheduler_names

    p = subparsers.add_parser(
        "invert",
        help="DDIM-invert an image to its starting noise x_T (for reconstruction and editing)",
        description="Run the one sampler backwards (DDIMInverseScheduler) from IMAGE to x_T; writes a .safetensors "
        "file with the latents and the replayable inversion request.",
    )
    p.add_argument("image", help="the image to invert (the model's resolution unless --height/--width say otherwise)")
    p.add_argument("--prompt", required=True, help="the image's caption (the condition of the inversion)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used only with --cfg > 1)")
    p.add_argument("--out", required=True, help="output x_T file (.safetensors)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50; reconstruct with the same number)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the inversion (default 1: plain DDIM)")
    p.add_argument("--reconstruct", default=None, help="also write the reconstruction from x_T to this PNG and print "
                   "its PSNR against the input")
    p.add_argument("--reconstruct-cfg", type=float, default=1.0,
                   help="guidance scale of the reconstruction (default 1)")
    p.add_argument("--reconstruct-scheduler", default="ddim", help=f"one of {', '.join(scheduler_names())}")
    p.add_argument("--negative-prompt-inversion", action="store_true",
                   help="reconstruct with the prompt as the negative prompt (keeps CFG > 1 faithful)")
    p.add_argument("--model", default=None, help=f"model bundle directory (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_bundle(model: str | None, device: str | None) -> Any:
    """The bundle at `model` (default: the shipped zoo) on `device` (default: cuda if available)."""
    import torch

    from mmsynth.models import Bundle

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise InputError(f"--device '{device}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    return Bundle.from_pretrained(resolve_model(model or DEFAULT_MODEL)).to(device)


def check_file_out(path: Path, suffix: str, what: str, overwrite: bool) -> None:
    if path.suffix.lower() != suffix:
        raise InputError(f"{what} '{path}' must end with {suffix}")
    if path.is_dir():
        raise InputError(f"{what} '{path}' is a folder; expected a file path")
    if path.exists() and not overwrite:
        raise InputError(f"{what} '{path}' already exists (pass --overwrite to replace it)")


def run(args: argparse.Namespace) -> int:
    from mmsynth.io import load_image, save_image
    from mmsynth.sample.inversion import invert, psnr, reconstruct, save_latents
    from mmsynth.sample.schedulers import check_scheduler_name

    out = Path(args.out)
    check_file_out(out, ".safetensors", "--out", args.overwrite)
    if args.reconstruct is not None:
        check_file_out(Path(args.reconstruct), ".png", "--reconstruct", args.overwrite)
        check_scheduler_name(args.reconstruct_scheduler, "--reconstruct-scheduler")
    image = load_image(args.image, "IMAGE")
    bundle = load_bundle(args.model, args.device)
    result = invert(bundle, image, args.prompt, steps=args.steps, cfg=args.cfg, negative_prompt=args.negative_prompt,
                    progress=not args.quiet)
    result.request.model = args.model or DEFAULT_MODEL
    rec = None
    if args.reconstruct is not None:  # computed before anything is written: no partial outputs on error
        rec = reconstruct(bundle, result.latents, args.prompt, steps=args.steps, cfg=args.reconstruct_cfg,
                          scheduler=args.reconstruct_scheduler,
                          negative_prompt_inversion=args.negative_prompt_inversion, progress=not args.quiet)
    save_latents(result.latents, out, result.request)
    print(f"wrote x_T {tuple(result.latents.shape)} to {out}")
    if rec is not None:
        save_image(rec.images[0], args.reconstruct)
        print(f"wrote the reconstruction to {args.reconstruct}: PSNR {psnr(rec.images[0], image):.2f} dB vs the input")
    return 0
