"""`mmsynth layout`: draw a layout file to check it by eye, and plan a layout from a prompt (text -> layout, the
first stage of LLM-grounded diffusion)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mmsynth.cli.arguments import seed
from mmsynth.errors import InputError
from mmsynth.sample.layout import Layout

SIZE_RANGE = (16, 4096)
DEFAULT_SIZE = 256
LAYOUT_FORMAT = """\
A layout file is JSON, boxes as fractions of the image (origin top left, x0 < x1, y0 < y1), at most 30 of them:
  {"prompt": "two red circles left of a blue square",
   "objects": [{"box": [0.05, 0.3, 0.35, 0.6], "phrase": "red circle"}, ...]}
or a bare list of such objects."""

PLAN_EPILOG = """\
planners:
  shapes     rule-based and exact for the Shapes caption grammar ("two red circles left of a blue square",
             "a large green star above a small yellow triangle"): every object gets a box shaped like the dataset's,
             the stated counts, sizes and relations hold; --seed varies the placement.
  llm:PATH   a local transformers causal language model folder (nothing is downloaded), prompted with examples in
             LMD's format; its answer ('red circle', [x, y, w, h]) is parsed into boxes. Greedy: --seed is unused.

examples:
  mmsynth layout plan --prompt "two red circles left of a blue square" --seed 3 -o layout.json --draw layout.png
  mmsynth layout draw layout.json -o check.png --image out/t2i/images/0000.png"""


def _size(value: str) -> int:
    try:
        x = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    lo, hi = SIZE_RANGE
    if not lo <= x <= hi:
        raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {value}")
    return x


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layout", help="draw a layout (named boxes) or plan one from a prompt",
                       description="Layouts are named boxes, the input of GLIGEN and the layout-guidance methods.\n\n"
                       + LAYOUT_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    lsub = p.add_subparsers(dest="layout_command", metavar="ACTION", required=True)

    d = lsub.add_parser("draw", help="draw a layout file's boxes and phrases to a PNG (one colour per phrase)",
                        description="Draw a layout's boxes, each phrase in its own stable colour, on black or over "
                        "an image.\n\n" + LAYOUT_FORMAT,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    d.add_argument("layout", metavar="LAYOUT.json", help="layout file")
    d.add_argument("-o", "--out", required=True, metavar="OUT.png", help="output PNG")
    d.add_argument("--size", type=_size, default=None,
                   help=f"side of the square drawing in pixels, {SIZE_RANGE[0]}..{SIZE_RANGE[1]} (default "
                   f"{DEFAULT_SIZE}; with --image, the image's own size)")  # fmt: skip
    d.add_argument("--image", metavar="IMG", help="draw over this image (e.g. a generated sample) instead of black")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    d.set_defaults(func=_draw)

    pl = lsub.add_parser("plan", help="plan a layout from a prompt (rule-based for Shapes, or a local LLM)",
                         description="Text -> layout: write the boxes a prompt asks for as a layout file, to feed "
                         "GLIGEN or layout guidance.", epilog=PLAN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    pl.add_argument("--prompt", required=True, help="the caption, e.g. 'two red circles left of a blue square'")
    pl.add_argument("--planner", default="shapes", metavar="shapes|llm:PATH",
                    help="which planner (default shapes; listed below)")
    pl.add_argument("--seed", type=seed, default=0, help="placement seed (default 0)")
    pl.add_argument("-o", "--out", required=True, metavar="OUT.json", help="output layout file")
    pl.add_argument("--draw", metavar="PNG", help="also draw the planned layout to this PNG")
    pl.add_argument("--size", type=_size, default=None,
                    help=f"side of the --draw picture in pixels, {SIZE_RANGE[0]}..{SIZE_RANGE[1]} (default "
                    f"{DEFAULT_SIZE})")  # fmt: skip
    pl.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pl.set_defaults(func=_plan)


def _drawing(layout: Layout, size: int, image: np.ndarray | None = None) -> np.ndarray:
    """The layout annotator's picture: on black at size x size, or over `image`."""
    from mmsynth.annotate import annotate

    canvas = image if image is not None else np.zeros((size, size, 3), np.uint8)
    thickness = max(1, round(min(canvas.shape[:2]) / 128))
    return annotate("layout", canvas, boxes=layout.boxes, phrases=layout.phrases, thickness=thickness,
                    background="image" if image is not None else "black")  # fmt: skip


def _draw(args: argparse.Namespace) -> int:
    from mmsynth.io import check_output_file, load_image, save_image

    if args.image is not None and args.size is not None:
        raise InputError("--size is for a blank drawing; with --image the drawing has the image's size")
    out = check_output_file(args.out, "--out", suffixes=(".png",), overwrite=args.overwrite)
    inputs = [Path(args.layout).absolute(), *([Path(args.image).absolute()] if args.image else [])]
    if out.absolute() in inputs:
        raise InputError(f"--out '{out}' is an input of this command; write the drawing elsewhere")
    layout = Layout.load(args.layout)
    image = load_image(args.image, "--image") if args.image is not None else None
    drawing = _drawing(layout, args.size or DEFAULT_SIZE, image)
    save_image(drawing, out)
    h, w = drawing.shape[:2]
    print(f"wrote {out} ({len(layout.objects)} boxes, {w}x{h})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mmsynth.io import check_output_file, save_image, write_json
    from mmsynth.sample.planning import get_planner

    out = check_output_file(args.out, "--out", suffixes=(".json",), overwrite=args.overwrite)
    draw = None
    if args.draw is not None:
        draw = check_output_file(args.draw, "--draw", suffixes=(".png",), overwrite=args.overwrite)
    elif args.size is not None:
        raise InputError("--size sets the --draw picture's size; give --draw PNG too")
    planner = get_planner(args.planner)
    layout = planner.plan(args.prompt, seed=args.seed)
    drawing = _drawing(layout, args.size or DEFAULT_SIZE) if draw is not None else None  # all work before writing
    write_json(layout.to_dict(), out)
    if draw is not None:
        save_image(drawing, draw)
    phrases = ", ".join(layout.phrases)
    print(f"wrote {out} ({len(layout.objects)} boxes: {phrases})" + (f" and {draw}" if draw is not None else ""))
    return 0
