"""`mmsynth edit`: prompt-swap editing of an image by DDIM inversion ("a red circle" -> "a blue circle").

The image is inverted under --source-prompt and regenerated under --prompt from the same x_T. By default
the source prompt is also the negative prompt (negative-prompt inversion), so CFG > 1 keeps what the
prompts share; --keep-attention F replays the source's self-attention queries/keys for the first F of
the steps (structure kept, content from the new prompt); --strength F inverts only the first F of the steps
and edits from there (partial inversion: more of the image kept); --null-text N tunes the unconditional
embedding of every step (null-text inversion, N Adam steps each) so that the cfg > 1 edit starts from an exact
reconstruction. --recolour M guides the new colour into the old colour's pixels (universal guidance).
--mask limits the edit to a region, --guide
adds universal guidance, --control a ControlNet or T2I-Adapter (on the edit's sampling, not on the inversion).
The output folder is `mmsynth generate`'s; its request replays the whole edit.
"""

from __future__ import annotations

import argparse
from typing import Any

from mmsynth.cli import control_options, guidance_options, model_options
from mmsynth.cli.arguments import finite_float, fraction, limits_from_args, non_negative_int
from mmsynth.cli.sampling_options import add_run_arguments, add_sampling_arguments, sampling_kwargs
from mmsynth.models.shipped import DEFAULT_MODEL, resolve_model
from mmsynth.sample.request import DEFAULT_INVERSION_STEPS

SAMPLING_OPTIONS = ("prompt", "steps", "cfg", "seed", "scheduler")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit an image by changing its caption (DDIM inversion + prompt swap)",
        description="Invert IMAGE under --source-prompt, regenerate it under --prompt; writes the same folder as\n"
        "`mmsynth generate` (PNG, replayable request, metadata.jsonl).",
        epilog=control_options.help_text(DEFAULT_MODEL),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="the image to edit")
    p.add_argument("--source-prompt", required=True, help="the image's caption, e.g. 'a red circle'")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    add_sampling_arguments(p, SAMPLING_OPTIONS, required=("prompt",), defaults={"steps": DEFAULT_INVERSION_STEPS},
                           helps={"prompt": "the edited caption, e.g. 'a blue circle'",
                                  "steps": "DDIM steps of inversion and generation (default {default})",
                                  "cfg": "guidance scale of the edit (default {default}; 1 = off)",
                                  "seed": "seed of stochastic schedulers and inpainting noise (default {default})"})
    p.add_argument("--keep-attention", type=fraction, default=0.0,
                   help="keep the source's self-attention for this fraction of the steps (0 = off, e.g. 0.5)")
    p.add_argument("--cross-attention", type=fraction, default=0.0,
                   help="prompt-to-prompt: the edited prompt attends where the source's words did for this fraction "
                   "of the steps (0 = off, e.g. 0.8; the prompts must differ only by swapped words)")
    p.add_argument("--strength", type=finite_float, default=1.0,
                   help="partial inversion: invert only this fraction of the steps and edit from there (default 1 = "
                   "from x_T; 0.5 keeps more of the image and edited the zoo's test renders best: docs/editing.md)")
    p.add_argument("--null-text", type=non_negative_int, default=0, metavar="N",
                   help="null-text inversion: tune the unconditional embedding of each step with N Adam steps "
                   "(0 = off; the paper: 10; DDIM only, cfg > 1; the bench's inversion_null_text row costs ~15x plain "
                   "inversion: docs/editing.md)")
    p.add_argument("--recolour", type=non_negative_int, default=0, metavar="M",
                   help="the prompts differ by one colour word: draw the new colour where the old one was with M "
                   "backward steps of the region guide per step, confined to the old colour's pixels (0 = off; "
                   "5 with --strength 0.5 edited the zoo's test renders best: docs/editing.md)")
    p.add_argument("--no-negative-prompt-inversion", action="store_true",
                   help="use an empty negative prompt instead of the source prompt (implied by --null-text)")
    guidance_options.add_arguments(p, latents=False)
    control_options.add_arguments(p)  # --control SPEC: a ControlNet / T2I-Adapter on the edit's sampling
    add_run_arguments(p, "an existing non-empty --out: only the files edit writes are replaced", images=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmsynth.cli.generate import recorded, sample_built, write_outputs
    from mmsynth.io import check_output_dir, load_image
    from mmsynth.sample.edit import edit_controls

    out = check_output_dir(args.out, overwrite=args.overwrite)
    image = load_image(args.image, "IMAGE")
    request, controls = edit_controls(image, args.source_prompt, **sampling_kwargs(args),
                                      keep_attention=args.keep_attention, cross_attention=args.cross_attention,
                                      negative_prompt_inversion=not args.no_negative_prompt_inversion,
                                      model=args.model or DEFAULT_MODEL, strength=args.strength,
                                      null_text=args.null_text, recolour=args.recolour)
    request.validate(limits_from_args(args))
    controls += guidance_options.controls_from_args(args, image)  # recorded by the sampler, with the edit's own
    if args.control:
        controls += control_options.controls_from_args(args, str(resolve_model(args.model or DEFAULT_MODEL)))
    bundle = model_options.load_bundle(args)
    result = sample_built(bundle, request, controls, progress=not args.quiet)
    write_outputs(out, result, recorded(request, result), args.overwrite)
    print(f"wrote the edit ('{args.source_prompt}' -> '{args.prompt}') to {out}")
    return 0
