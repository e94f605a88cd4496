"""`mmsynth data`: look at, export and inspect the procedural Shapes dataset."""

from __future__ import annotations

import argparse
import json

from mmsynth.cli.arguments import non_negative_int, positive_int, seed
from mmsynth.data import vocab

MAX_GRID_ROWS = 256  # `data show` draws every scene into one picture


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="the procedural Shapes dataset: show, export, spec, render",
                       description="The procedural Shapes dataset: every image, caption and annotation is a pure "
                       "function of (split, index, seed).")  # fmt: skip
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    splits = ", ".join(vocab.SPLITS)

    s = dsub.add_parser("show", help="write a grid PNG of samples next to their condition maps")
    s.add_argument("--split", default="train", help=f"one of {splits} (default: train)")
    s.add_argument("--n", type=positive_int, default=8, help=f"number of scenes (rows), at most {MAX_GRID_ROWS}")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--resolution", type=int, default=64, help="render size in pixels, 32..512 (default 64)")
    s.add_argument("--out", "-o", default="shapes_grid.png", help="output PNG (default: shapes_grid.png)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(func=_show)

    e = dsub.add_parser("export", help="write the Hugging Face imagefolder layout (PNGs + metadata.jsonl)",
                        description="Write images, condition maps (as extra PNG columns) and metadata.jsonl with "
                        "captions, the full scene spec and annotations. Load with "
                        "datasets.load_dataset('imagefolder', data_dir=OUT).")  # fmt: skip
    e.add_argument("--split", default="train", help=f"one of {splits}; 'heldout' has unseen colour-shape combos")
    e.add_argument("--n", type=positive_int, required=True, help="number of scenes")
    e.add_argument("--start", type=non_negative_int, default=0, help="first scene index (default 0)")
    e.add_argument("--seed", type=seed, default=0)
    e.add_argument("--resolution", type=int, default=64, help="32..512 (default 64)")
    e.add_argument("--out", "-o", required=True, help="output folder (must be empty or absent)")
    e.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder, replacing only what export writes (images/, "
                   "conditions/, metadata.jsonl)")
    e.set_defaults(func=_export)

    sp = dsub.add_parser("spec", help="print the JSON scene spec of (split, index, seed)")
    sp.add_argument("--split", default="train")
    sp.add_argument("--index", type=non_negative_int, default=0)
    sp.add_argument("--seed", type=seed, default=0)
    sp.set_defaults(func=_spec)

    r = dsub.add_parser("render", help="render a scene spec JSON file to a PNG at any resolution")
    r.add_argument("spec", help="scene spec JSON file (as printed by `mmsynth data spec`)")
    r.add_argument("--resolution", type=int, default=64, help="32..512 (default 64)")
    r.add_argument("--out", "-o", required=True, help="output PNG")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    r.set_defaults(func=_render)

    c = dsub.add_parser(
        "cache-latents",
        help="encode scenes with a VAE once, so latent diffusion training skips rendering and encoding",
        description="Render Shapes scenes 0..N-1 and store their VAE posteriors (mean, log-variance; float16) with "
        "their captions in shards. Train on it with `data: OUT` in a t2i config. Resumable: rerun the same "
        "command after an interruption, or with a larger --n to extend the cache.",
    )
    c.add_argument("--vae", required=True, help="folder with a vae/ component (a bundle or `mmsynth train vae` export)")
    c.add_argument("--n", type=positive_int, required=True, help="number of scenes (rounded up to whole shards)")
    c.add_argument("--out", "-o", required=True, help="cache folder (new, empty, or a cache to resume or extend)")
    c.add_argument("--split", default="train", help=f"one of {splits} (default: train)")
    c.add_argument("--seed", type=seed, default=0)
    c.add_argument("--shard-size", type=positive_int, default=8192, help="scenes per file (default 8192)")
    c.add_argument("--batch-size", type=positive_int, default=64, help="scenes per VAE call (default 64)")
    c.add_argument("--workers", type=non_negative_int, default=1,
                   help="rendering processes beside the encoder (default 1)")
    c.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                   help="bf16: encode under bf16 autocast (faster on CPUs with bf16 units)")  # fmt: skip
    c.set_defaults(func=_cache_latents)


def _show(args: argparse.Namespace) -> int:
    from mmsynth.data.render import check_resolution
    from mmsynth.data.show import dataset_grid
    from mmsynth.errors import InputError
    from mmsynth.io import check_output_file, save_image

    check_output_file(args.out, "--out", suffixes=(".png",), overwrite=args.overwrite)
    check_resolution(args.resolution)
    if args.n > MAX_GRID_ROWS:
        raise InputError(f"--n {args.n} is above the {MAX_GRID_ROWS} rows one grid picture holds; export many scenes "
                         "with `mmsynth data export`")
    img = dataset_grid(args.split, args.n, args.seed, args.resolution, zoom=max(1, 128 // args.resolution))
    save_image(img, args.out)
    print(f"wrote {args.out} ({args.n} scenes of split '{args.split}')")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mmsynth.data.export import export_split

    out = export_split(args.split, args.n, args.out, args.seed, args.resolution, args.start, args.overwrite)
    print(f"wrote {args.n} scenes to {out} (load with datasets.load_dataset('imagefolder', data_dir='{out}'))")
    return 0


def _spec(args: argparse.Namespace) -> int:
    from mmsynth.data.scene import sample_scene

    print(json.dumps(sample_scene(args.split, args.index, args.seed).to_dict(), indent=2))
    return 0


def _render(args: argparse.Namespace) -> int:
    from mmsynth.data.render import check_resolution, render
    from mmsynth.data.scene import load_scene_file
    from mmsynth.io import check_output_file, save_image

    check_output_file(args.out, "--out", suffixes=(".png",), overwrite=args.overwrite)
    check_resolution(args.resolution)
    save_image(render(load_scene_file(args.spec), args.resolution), args.out)
    print(f"wrote {args.out}")
    return 0


def _cache_latents(args: argparse.Namespace) -> int:
    from mmsynth.train.latent_cache import build_latent_cache

    out = build_latent_cache(
        args.vae, args.out, args.n, split=args.split, seed=args.seed, shard_size=args.shard_size,
        batch_size=args.batch_size, num_workers=args.workers, mixed_precision=args.mixed_precision,
    )  # fmt: skip
    print(f"latent cache of {args.n} '{args.split}' scenes in {out} (train on it with `data: {out}`)")
    return 0
