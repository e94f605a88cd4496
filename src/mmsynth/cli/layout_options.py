"""`--layout FILE`, `--box`, `--plan` and `--layout-method`: layout control on the command line of `mmsynth generate`.

A layout (named boxes) comes from a JSON file (`--layout`), from `--box "x0,y0,x1,y1=phrase"` flags, or from the
prompt through a planner (`--plan shapes`, LLM-grounded diffusion's first stage); `--layout-method` picks the method
that draws it. Each method is one control of the one sampler, built from its registered name, so the request records
the boxes and replays without planning again:

    gligen    GLIGEN's grounding tokens (needs a model with the `gligen` component; grounding on the first 30%)
    backward  backward layout guidance (Chen et al.): the latent moved until each phrase's attention is in its box
    forward   forward layout guidance: each phrase's cross-attention mixed into its box (no gradients)
    regional  regional prompts: each box attends to its own phrase as a prompt (masked cross-attention)

Not a command: `generate` adds the options with `add_arguments` and builds the control with `layout_control`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from mmsynth.errors import InputError

if TYPE_CHECKING:
    from mmsynth.sample.controls import Control
    from mmsynth.sample.layout import Layout

OPTION_NAMES = ("layout", "box", "plan", "layout_method")
METHODS = ("gligen", "backward", "forward", "regional")  # sample.layout.LAYOUT_METHODS (a test checks they agree)
DEFAULT_METHOD = "gligen"
HELP = """\
layout (named boxes; fractions of the image, origin top left):
  --layout layout.json                      {"prompt": ..., "objects": [{"box": [x0, y0, x1, y1], "phrase": ...}]}
  --box "0.1,0.3,0.4,0.6=red circle"        one box per flag (with --prompt)
  --plan shapes                             plan the boxes from --prompt (Shapes grammar: counts, sizes, relations)
  --layout-method gligen|backward|forward|regional   (default gligen: needs the model's gligen component)
  e.g. mmsynth generate --prompt "two red circles left of a blue square" --plan shapes --out out/planned"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layout (GLIGEN, layout guidance, regional prompts)")
    g.add_argument("--layout", default=None, metavar="FILE",
                   help="a layout JSON file (boxes + phrases, optional prompt used when --prompt is not given)")
    g.add_argument("--box", action="append", default=None, metavar="X0,Y0,X1,Y1=PHRASE",
                   help="one named box (repeat the flag for more)")
    g.add_argument("--plan", default=None, metavar="PLANNER",
                   help="plan the layout from --prompt: 'shapes' (rule-based, the Shapes grammar) or 'llm:PATH' (a "
                   "local transformers causal LM); the seed is --seed")  # fmt: skip
    g.add_argument("--layout-method", default=None, choices=sorted(METHODS),
                   help=f"how the layout is drawn (default {DEFAULT_METHOD})")


def parse_box(text: str) -> tuple[list[float], str]:
    """"x0,y0,x1,y1=phrase" -> (box, phrase); InputError naming the flag and the syntax."""
    coords, sep, phrase = text.partition("=")
    try:
        box = [float(v) for v in coords.split(",")]
    except ValueError:
        box = []
    if not sep or len(box) != 4 or not phrase.strip():
        raise InputError(f"--box '{text}' must be X0,Y0,X1,Y1=PHRASE (fractions of the image), e.g. "
                         "'0.1,0.3,0.4,0.6=red circle'")
    return box, phrase.strip()


def layout_from_args(args: argparse.Namespace, prompt: str, seed: int) -> Layout | None:
    """The layout the arguments give (one source at most), or None without layout options."""
    from mmsynth.sample.layout import Layout

    sources = [flag for flag, value in (("--layout", args.layout), ("--box", args.box), ("--plan", args.plan))
               if value]
    if len(sources) > 1:
        raise InputError(f"give the layout one way: {' and '.join(sources)} were both given")
    if not sources:
        if args.layout_method is not None:
            raise InputError("--layout-method needs a layout: --layout FILE, --box or --plan PLANNER")
        return None
    if args.layout:
        return Layout.load(args.layout)
    if args.box:
        pairs = [parse_box(b) for b in args.box]
        return Layout.from_lists([b for b, _ in pairs], [p for _, p in pairs], prompt, where="--box")
    from mmsynth.sample.planning import get_planner

    if not prompt:
        raise InputError("--plan plans the layout from the prompt: give --prompt")
    return get_planner(args.plan).plan(prompt, seed)


def layout_control(layout: Layout, method: str | None) -> Control:
    """The control that draws `layout` with `method` (validated by the control itself)."""
    from mmsynth.sample.layout import layout_method_control

    return layout_method_control(method or DEFAULT_METHOD, layout.boxes, layout.phrases)


def controls_from_args(args: argparse.Namespace, prompt: str, seed: int) -> tuple[list[Any], Layout | None]:
    """([the layout control], the layout) from the arguments, or ([], None) without layout options."""
    layout = layout_from_args(args, prompt, seed)
    if layout is None:
        return [], None
    return [layout_control(layout, args.layout_method)], layout
