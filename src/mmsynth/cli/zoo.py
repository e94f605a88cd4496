"""`mmsynth zoo ship`: put a trained model into the Shapes zoo bundle, measured by the bench and carded.

  mmsynth zoo ship t2i --bundle runs/t2i/final --out models/shapes-v1 --overwrite   the whole bundle and its card
  mmsynth zoo ship clip --run runs/clip_vision_8l_more --val-seed 7                 clip/ (if it beats the shipped)
  mmsynth zoo ship inpainting --run runs/inpaint --overwrite                         unet_inpainting/ and its card
  mmsynth zoo ship control --run runs/controlnet_canny [--step N]                   controlnet_canny/ and its card
  mmsynth zoo ship gligen --run runs/gligen [--step N]                               gligen/ (layers) and its card
  mmsynth zoo curve --run runs/controlnet_canny --n 16                               its condition-following curve

Each part is built in a temporary copy of --out, measured there with the bench commands its card quotes (rerun any
of them to check a figure), and renamed into place only when accepted; a refusal leaves --out as it was. Bench
reports (JSON, Markdown, HTML) go to --reports, not into the bundle. How the zoo is trained: docs/training.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmsynth.cli.arguments import fraction, non_negative_float, positive_int, resolve_device, seed
from mmsynth.errors import InputError
from mmsynth.models.shipped import DEFAULT_MODEL

PARTS_RECORD = "docs/zoo_parts.md"


def _cfg_values(value: str) -> list[float]:
    """--cfg: comma-separated guidance scales, each a finite number >= 0."""
    values = [v.strip() for v in value.split(",")]
    if not all(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,3,7, got {value!r}")
    return [non_negative_float(v) for v in values]


def _bench(argv: Sequence[str]) -> int:
    from mmsynth.cli.main import main

    return main(list(argv))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _common(p: argparse.ArgumentParser, out_help: str, reports: str, overwrite_help: str) -> None:
    p.add_argument("--out", default=DEFAULT_MODEL, help=f"{out_help} (default {DEFAULT_MODEL})")
    p.add_argument("--reports", default=reports, help=f"folder for the bench reports (default {reports})")
    p.add_argument("--overwrite", action="store_true", help=f"replace {overwrite_help}earlier bench reports of the "
                   "same names in --reports")  # fmt: skip


def _parts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=None, metavar="FILE",
                   help=f"the parts' record whose training table the card quotes (default {PARTS_RECORD})")
    p.add_argument("--no-parts", action="store_true", help="quote no parts' record")


def register(sub: Any) -> None:
    p = sub.add_parser("zoo", help="ship trained models into the Shapes zoo bundle, measured and carded",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.set_defaults(func=lambda args: _usage(p))
    zsub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    s = zsub.add_parser("ship", help="ship one part: t2i (the whole bundle), clip, inpainting or control",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    s.set_defaults(func=lambda args: _usage(s))
    parts = s.add_subparsers(dest="part", metavar="PART")

    t = parts.add_parser("t2i", help="the text-to-image bundle as --out (replaced whole), with its model card",
                         description="Copy a text-to-image export (and, with --clip, a CLIP whose text tower is its "
                         "text encoder) to --out, replacing it whole (--overwrite; a shipped unet_inpainting/ is "
                         "kept); measure it with `mmsynth bench components`, `bench run --suite t2i` and a CFG sweep; "
                         "write README.md, the model card, with every figure under its command.")  # fmt: skip
    t.add_argument("--bundle", default="runs/t2i/final", help="the t2i export (default runs/t2i/final)")
    t.add_argument("--clip", default=None, metavar="DIR", help="a `mmsynth train clip` export whose clip/ ships "
                   "instead (its text tower must be the bundle's text encoder: checked)")  # fmt: skip
    t.add_argument("--runs", default="runs", help="the training runs folder the card reads (configs, logs, wall times)")
    _parts(t)
    t.add_argument("--n", type=positive_int, default=500, help="t2i cases per category (default 500)")
    t.add_argument("--sweep-n", type=positive_int, default=100, help="cases per category per CFG value (default 100)")
    t.add_argument("--cfg", type=_cfg_values, default=None, metavar="V1,V2",
                   help="CFG values of the sweep beside the bench's own 5 (default 1,3,7)")
    t.add_argument("--no-sweep", action="store_true", help="no CFG sweep (the card then has no sweep section)")
    t.add_argument("--components-n", type=positive_int, default=1000,
                   help="test pairs for VAE PSNR and CLIP retrieval (default 1000)")
    t.add_argument("--seed", type=seed, default=1, help="case seed of the bench runs (the sweep uses seed + 1)")
    _common(t, "the shipped folder, replaced whole", "runs/ship/t2i", "an existing --out and ")
    t.set_defaults(func=_ship_t2i)

    c = parts.add_parser("clip", help="a CLIP stage's export into --out as clip/, if it beats the shipped one",
                         description="Replace --out's clip/ by a CLIP stage's CLIP (float16) when its text tower is "
                         "the bundle's text encoder and its caption-consistent retrieval beats the shipped one "
                         "(--allow-worse ships anyway) and reaches --at-least; a stage that adds weight must name "
                         "--at-least. Rewrites the card's weights line, parts table and Components section.")
    c.add_argument("--run", required=True, help="the CLIP training run folder (its export: RUN/final)")
    c.add_argument("--n", type=positive_int, default=1000, help="test pairs for retrieval and PSNR (default 1000)")
    c.add_argument("--val-seed", type=seed, default=None,
                   help="also measure retrieval on the val split with this seed and put it on the card")
    c.add_argument("--at-least", type=fraction, default=None, metavar="F",
                   help="refuse unless test retrieval reaches F too (e.g. 0.90 for a stage that adds weight)")
    c.add_argument("--allow-worse", action="store_true", help="ship even if retrieval does not beat the shipped CLIP")
    c.add_argument("--command", default="mmsynth train clip", help="the command that trained the run, for the card")
    _parts(c)
    _common(c, "the bundle whose clip/ is replaced", "runs/ship/clip", "")
    c.set_defaults(func=_ship_clip)

    i = parts.add_parser("inpainting", help="an inpainting UNet into --out as unet_inpainting/, with its card",
                         description="Put the UNet of a `mmsynth train inpaint` run into --out as unet_inpainting/ "
                         "(an existing one only with --overwrite), benchmark inpainting against blended latents, and "
                         "write its card and the bundle card's pointer to it.")  # fmt: skip
    i.add_argument("--run", default="runs/inpaint", help="the inpainting training run (its export: RUN/final)")
    i.add_argument("--n", type=positive_int, default=200, help="inpaint cases (default 200)")
    i.add_argument("--seed", type=seed, default=3, help="case seed (default 3)")
    _common(i, "the bundle that gets unet_inpainting/", "runs/ship/inpainting",
            "an existing unet_inpainting/ and ")
    i.set_defaults(func=_ship_inpainting)
    _register_control(parts)
    _register_gligen(parts)
    _register_curve(zsub)


def _register_control(parts: Any) -> None:
    from mmsynth.evaluate.ship.curve import DEFAULT_N

    k = parts.add_parser("control", help="a ControlNet or T2I-Adapter run into --out as its control component, carded",
                         description="Put the network of a `mmsynth train controlnet|t2i-adapter` run (RUN/final, or "
                         "RUN/exports/step_N with --step) into --out as the component the control bench suite "
                         "measures (named from the run's recipe and options.condition: controlnet_canny, "
                         "controlnet_segmentation, adapter_depth, adapter_sketch, adapter_palette; --name overrides), "
                         "in float16; bench it on its category against the prompt alone; measure its "
                         "condition-following curve over the run's snapshots (cached in RUN/curve); write its card. "
                         "An existing component of that name is replaced only with --overwrite.")  # fmt: skip
    k.add_argument("--run", required=True, help="the control training run (its config.yaml names recipe and condition)")
    k.add_argument("--step", type=positive_int, default=None, metavar="N",
                   help="ship the snapshot RUN/exports/step_N, not RUN/final")
    k.add_argument("--name", default=None, help="the component name (default: from the run's recipe and condition)")
    k.add_argument("--n", type=positive_int, default=None, help="bench cases (default: the control suite's, 300)")
    _measure_args(k, "of the bench and the curve")
    k.add_argument("--curve-n", type=positive_int, default=DEFAULT_N,
                   help=f"curve cases per snapshot (default {DEFAULT_N})")
    k.add_argument("--curve-every", type=positive_int, default=None, metavar="K",
                   help="curve: only the snapshots at multiples of K steps (default: all)")
    k.add_argument("--curve-out", default=None, metavar="DIR", help="the curve's folder (default RUN/curve: its cache)")
    k.add_argument("--no-curve", action="store_true", help="no condition-following curve on the card")
    _parts(k)
    _common(k, "the bundle that gets the component", "runs/ship/control", "an existing component of that name and ")
    k.set_defaults(func=_ship_control)


def _register_gligen(parts: Any) -> None:
    g = parts.add_parser("gligen", help="a GLIGEN run's grounding layers into --out as gligen/, carded",
                         description="Put the grounding layers of a `mmsynth train gligen` run (RUN/final/gligen, or "
                         "RUN/exports/step_N/gligen with --step) into --out as gligen/ (layers over its unet/), bench "
                         "them on the layout suite against the prompt alone, and write their card. An existing "
                         "gligen/ is replaced only with --overwrite.")  # fmt: skip
    g.add_argument("--run", default="runs/gligen", help="the GLIGEN training run (default runs/gligen)")
    g.add_argument("--step", type=positive_int, default=None, metavar="N",
                   help="ship the snapshot RUN/exports/step_N, not RUN/final")
    g.add_argument("--n", type=positive_int, default=300, help="layout cases (default 300)")
    g.add_argument("--seed", type=seed, default=5, help="case seed (default 5)")
    _parts(g)
    _common(g, "the bundle that gets gligen/", "runs/ship/gligen", "an existing gligen/ and ")
    g.set_defaults(func=_ship_gligen)


def _ship_gligen(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship import ship_gligen

    ship_gligen(Path(args.run), Path(args.out), _bench, step=args.step, n=args.n, seed=args.seed,
                reports=Path(args.reports), parts=_parts_file(args), overwrite=args.overwrite)  # fmt: skip
    return 0


def _measure_args(p: argparse.ArgumentParser, of: str, device_of: str = "of the curve") -> None:
    """--seed, --steps, --cfg and --device, shared by `zoo ship control` and `zoo curve` so a curve cached by one is
    found by the other."""
    from mmsynth.evaluate.ship.curve import DEFAULT_SEED

    p.add_argument("--seed", type=seed, default=DEFAULT_SEED, help=f"case seed {of} (default {DEFAULT_SEED})")
    p.add_argument("--steps", type=positive_int, default=None, help=f"sampler steps {of} (default: the bench's, 25)")
    p.add_argument("--cfg", type=non_negative_float, default=None,
                   help=f"classifier-free guidance scale {of} (default: the bench's, 5)")
    p.add_argument("--device", default=None, help=f"torch device {device_of} (default: cuda if available, else cpu)")


def _register_curve(zsub: Any) -> None:
    from mmsynth.evaluate.ship.curve import DEFAULT_N

    c = zsub.add_parser("curve", help="a control run's condition-following curve: its metric at every snapshot",
                        description="Measure every snapshot of a `mmsynth train controlnet|t2i-adapter` run "
                        "(RUN/exports/step_N, and RUN/final) as its control component in the base bundle, on the "
                        "same control-suite cases with the same seeds (canny_f1, segmentation_miou, depth_order, "
                        "sketch_ssim or palette_error, by the component's category), beside the prompt alone; write "
                        "OUT/curve.json and OUT/curve.png (metric against step, no_control as a line). Points already "
                        "in OUT/curve.json for the same weights and settings are reused: rerun it as the run goes "
                        "on.")  # fmt: skip
    c.add_argument("--run", required=True, help="the control training run")
    c.add_argument("--name", default=None, help="the component it stands in for (default: from recipe and condition)")
    c.add_argument("--model", default=None, help="the bundle it is measured in (default: the run's options.base)")
    c.add_argument("--n", type=positive_int, default=DEFAULT_N, help=f"cases (default {DEFAULT_N})")
    c.add_argument("--every", type=positive_int, default=None, metavar="K",
                   help="only the snapshots at multiples of K steps (default: all)")
    _measure_args(c, "of the curve")
    c.add_argument("--out", default=None, help="folder of curve.json and curve.png (default RUN/curve)")
    c.add_argument("--overwrite", action="store_true", help="replace a curve measured under other settings")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_curve)


def _parts_file(args: argparse.Namespace) -> Path | None:
    """--parts, or the default record; none with --no-parts (both: refused, not one silently ignored)."""
    if args.no_parts and args.parts is not None:
        raise InputError("give --parts FILE or --no-parts, not both")
    return None if args.no_parts else Path(args.parts or PARTS_RECORD)


def _sweep(args: argparse.Namespace) -> list[float]:
    """The CFG values of the sweep: --cfg, the default, or none with --no-sweep (both: refused)."""
    if args.no_sweep and args.cfg is not None:
        raise InputError("give --cfg V1,V2 or --no-sweep, not both")
    return [] if args.no_sweep else (args.cfg or [1.0, 3.0, 7.0])


def _ship_t2i(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship import ship_t2i

    ship_t2i(Path(args.bundle), Path(args.out), _bench, clip=Path(args.clip) if args.clip else None,
             runs=Path(args.runs), parts=_parts_file(args), reports=Path(args.reports), n=args.n,
             sweep_n=args.sweep_n, cfg=_sweep(args), components_n=args.components_n,
             seed=args.seed, overwrite=args.overwrite)  # fmt: skip
    return 0


def _ship_clip(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship import ship_clip

    ship_clip(Path(args.run), Path(args.out), _bench, n=args.n, reports=Path(args.reports),
              allow_worse=args.allow_worse, at_least=args.at_least, parts=_parts_file(args), command=args.command,
              val_seed=args.val_seed, overwrite=args.overwrite)  # fmt: skip
    return 0


def _ship_inpainting(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship import ship_inpainting

    ship_inpainting(Path(args.run), Path(args.out), _bench, n=args.n, seed=args.seed, reports=Path(args.reports),
                    overwrite=args.overwrite)  # fmt: skip
    return 0


def _ship_control(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship import ship_control

    ship_control(Path(args.run), Path(args.out), _bench, step=args.step, name=args.name, n=args.n, seed=args.seed,
                 steps=args.steps, cfg=args.cfg, reports=Path(args.reports), curve=not args.no_curve,
                 curve_n=args.curve_n, curve_every=args.curve_every,
                 curve_out=Path(args.curve_out) if args.curve_out else None, device=resolve_device(args.device),
                 parts=_parts_file(args), overwrite=args.overwrite)  # fmt: skip
    return 0


def _curve(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.ship.curve import CURVE_FILE, CURVE_PLOT, condition_curve, control_run, curve_lines

    run = control_run(Path(args.run), args.name)
    out = Path(args.out) if args.out else run.folder / "curve"
    curve = condition_curve(run, out, model=Path(args.model) if args.model else None, n=args.n, seed=args.seed,
                            every=args.every, steps=args.steps, cfg=args.cfg, device=resolve_device(args.device),
                            progress=not args.quiet, overwrite=args.overwrite)  # fmt: skip
    print("\n".join(curve_lines(curve)))
    print(f"wrote {out / CURVE_FILE} and {out / CURVE_PLOT}")
    return 0
