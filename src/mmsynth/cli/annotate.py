"""`mmsynth annotate KIND IMAGE -o OUT`: run one condition extractor on an image or a Shapes scene spec."""

from __future__ import annotations

import argparse
import json

import numpy as np

from mmsynth.annotate import from_scene, get_annotator, list_annotators
from mmsynth.annotate.color import histogram_plot
from mmsynth.data.scene import load_scene_file
from mmsynth.errors import InputError
from mmsynth.io import atomic_path, check_output_file, load_image, save_image, write_json

MAP_SUFFIXES = (".png", ".npy")
VECTOR_SUFFIXES = (".npy", ".json", ".png")


def kinds_help() -> str:
    """The kinds and their parameters (type, range, default), as `--help` shows them."""
    lines = ["kinds (parameters as --param NAME=VALUE):"]
    for a in list_annotators():
        lines.append(f"  {a.name:<13}[{a.output}] {a.help}")
        for p in a.params:
            default = json.dumps(list(p.default)) if isinstance(p.default, tuple) else p.default
            lines.append(f"      {p.name}: {p.range_text()}, default {default}. {p.help}")
    lines.append("")
    lines.append("With --scene SCENE.json (a Shapes spec) instead of IMAGE, these kinds are exact from the spec:")
    lines.append("  instance, semantic, color, depth, edges, segmentation (= semantic); layout draws the spec's boxes;")
    lines.append("  any other kind annotates the scene's render at --resolution.")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "annotate",
        help="extract a condition (edges, sketch, colour, segmentation, mask, ...) from an image",
        description="Extract a condition map from any RGB image, or exact maps from a Shapes scene spec.",
        epilog=kinds_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", metavar="KIND", help="annotator kind (listed below)")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="input image (any mode; converted to RGB)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .png/.npy (histogram .npy/.json/.png)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="annotator parameter")
    p.add_argument("--scene", metavar="SCENE.json", help="a Shapes scene spec instead of IMAGE")
    p.add_argument("--resolution", type=int, default=None, help="render resolution with --scene (32..512, default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def parse_params(items: list[str]) -> dict[str, str]:
    """NAME=VALUE strings -> dict; values stay strings (the registry coerces and range-checks them)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--param '{item}' must look like NAME=VALUE")
        out[name.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    spec = get_annotator(args.kind) if args.scene is None else None
    output_kind = spec.output if spec else ("vector" if args.kind == "histogram" else "map")
    valid = VECTOR_SUFFIXES if output_kind == "vector" else MAP_SUFFIXES
    out = check_output_file(args.out, "--out", suffixes=valid, overwrite=args.overwrite)
    suffix = out.suffix.lower()
    params = parse_params(args.param)
    if args.resolution is not None and args.scene is None:
        raise InputError("--resolution needs --scene (an IMAGE is annotated at its own size)")
    if args.scene is not None:
        if args.image is not None:
            raise InputError("give either IMAGE or --scene, not both")
        result = from_scene(args.kind, load_scene_file(args.scene), args.resolution or 64, **params)
    else:
        if args.image is None:
            raise InputError(f"'{args.kind}' needs an IMAGE (or --scene SCENE.json)")
        spec = get_annotator(args.kind)
        spec.resolve(params)  # fail on bad parameters before reading the image
        result = spec(load_image(args.image), **params)
    if suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, result)
    elif suffix == ".json":
        write_json([float(v) for v in result], out)
    elif result.ndim == 1:
        save_image(histogram_plot(result), out)
    else:
        save_image(result, out)
    print(f"wrote {out} ({args.kind}, shape {'x'.join(map(str, result.shape))}, {result.dtype})")
    return 0
