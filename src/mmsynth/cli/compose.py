"""`mmsynth compose`: generate from representations of several images recombined (Composer).

    mmsynth compose --from A.png:sketch,segmentation --from B.png:histogram --prompt "..." --out OUT

Each --from decomposes one image into the named representations (sample/composer.py `decompose`); a Shapes scene
spec (.json) instead of an image gives exact maps (depth needs one: no depth estimator ships). --reference-from sets
the condition set guidance starts from (eps = w * eps(conditions) + (1 - w) * eps(reference), --weight w). OUT is
written as `mmsynth generate` writes it, plus representations.png (each local map given, labelled).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from mmsynth.cli import model_options
from mmsynth.cli.arguments import finite_float, limits_from_args
from mmsynth.cli.sampling_options import add_run_arguments, add_sampling_arguments, sampling_kwargs
from mmsynth.errors import InputError

SAMPLING = ("prompt", "negative_prompt", "n", "seed", "steps", "cfg", "scheduler", "height", "width", "eta")
VALID = ("sketch", "segmentation", "depth", "intensity", "masked_image", "image", "histogram")  # = composer's


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compose", help="generate from representations of several images (Composer)",
        description="Recombine representations of images: each --from IMAGE:REPS decomposes IMAGE into REPS (any of "
        f"{', '.join(VALID)}); the model's composer components generate from them and the prompt.",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="IMAGE:REPS",
                   help="an image (or a Shapes scene .json) and the representations to take from it, comma-separated, "
                   "e.g. a.png:sketch,segmentation; repeat for several images (a representation once)")
    p.add_argument("--mask", default=None, help="with masked_image: binary PNG, white = hidden (regenerated)")
    p.add_argument("--reference-from", dest="reference", action="append", default=None, metavar="IMAGE:REPS",
                   help="the condition set guidance starts from (c1): eps = w * eps(--from sets) + (1 - w) * eps(c1)")
    p.add_argument("--weight", type=finite_float, default=3.0, help="w of --reference-from (default 3)")
    add_sampling_arguments(p, SAMPLING, defaults={"n": 1})
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    add_run_arguments(p, "an existing non-empty --out: only the files compose writes are replaced")
    p.set_defaults(func=run)


def parse_source(spec: str) -> tuple[str, list[str]]:
    """'a.png:sketch,depth' -> ('a.png', ['sketch', 'depth']); InputError naming what is valid."""
    path, sep, reps = spec.rpartition(":")
    names = [r.strip() for r in reps.split(",") if r.strip()]
    if not sep or not path or not names:
        raise InputError(f"--from '{spec}' must be IMAGE:REPS, e.g. a.png:sketch,histogram (valid: {', '.join(VALID)})")
    if unknown := [n for n in names if n not in VALID]:
        raise InputError(f"--from '{spec}': unknown representation '{unknown[0]}'; valid: {', '.join(VALID)}")
    return path, names


def representations(bundle: Any, specs: list[str], mask: np.ndarray | None, resolution: int) -> dict[str, Any]:
    """Every representation the specs ask for, each from its image (one source per representation)."""
    from mmsynth.data.render import render
    from mmsynth.data.scene import Scene
    from mmsynth.io import load_image, read_json_file
    from mmsynth.sample.composer import decompose

    out: dict[str, Any] = {}
    for spec in specs:
        path, names = parse_source(spec)
        if twice := [n for n in names if n in out]:
            raise InputError(f"--from '{spec}': representation '{twice[0]}' is already taken from another image")
        scene = None
        if Path(path).suffix.lower() == ".json":
            scene = Scene.from_dict(read_json_file(path, "--from"), where=f"--from '{path}'")
            image = render(scene, resolution)
        else:
            image = load_image(path, "--from")
        out.update(decompose(bundle, image, names, mask=mask, scene=scene))
    return out


def run(args: argparse.Namespace) -> int:
    from mmsynth.cli.generate import recorded, sample_built, write_outputs
    from mmsynth.io import check_output_dir, load_image
    from mmsynth.models.shipped import DEFAULT_MODEL
    from mmsynth.sample import Composer, GenerationRequest
    from mmsynth.sample.inpaint import binary_mask

    out = check_output_dir(args.out, overwrite=args.overwrite)
    for spec in [*args.sources, *(args.reference or [])]:
        parse_source(spec)  # syntax errors before the model loads
    request = GenerationRequest(**sampling_kwargs(args), model=args.model or DEFAULT_MODEL)
    request.validate(limits_from_args(args))
    bundle = model_options.load_bundle(args)
    mask = None if args.mask is None else binary_mask(load_image(args.mask, "--mask"), "--mask", "hidden")
    side = request.height or bundle.resolution
    conditions = representations(bundle, args.sources, mask, side)
    reference = None if args.reference is None else representations(bundle, args.reference, mask, side)
    control = Composer(conditions=conditions, reference=reference, weight=args.weight)
    result = sample_built(bundle, request, [control], progress=not args.quiet)
    write_outputs(out, result, recorded(request, result), args.overwrite)
    _write_representations(out, conditions)
    print(f"wrote {len(result.images)} image(s) composed from {', '.join(conditions)} to {out}")
    return 0


def _write_representations(out: Path, conditions: dict[str, Any]) -> None:
    """representations.png: every local map given, labelled (vectors have no picture)."""
    from mmsynth.io import save_image
    from mmsynth.viz import grid, label

    tiles = []
    for name, value in conditions.items():
        arr = np.asarray(value)
        if arr.ndim < 2:
            continue
        if arr.ndim == 3 and arr.shape[2] == 4:  # the masked image: its pixels, the mask shown black
            arr = arr[..., :3]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        tiles.append(label(np.ascontiguousarray(arr), name, height=10))
    if tiles:
        save_image(grid(tiles, cols=len(tiles)), out / "representations.png")
