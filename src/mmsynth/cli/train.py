"""`mmsynth train RECIPE`: run the one trainer with a recipe's config (YAML + command-line overrides)."""

from __future__ import annotations

import argparse

from mmsynth.cli.arguments import positive_float, positive_int
from mmsynth.train.recipes import RECIPES

EPILOG = """\
Precedence: built-in defaults < the recipe's defaults < --config FILE < flags and --set.
--set takes any config key (see configs/*.yaml), recipe options as options.KEY, e.g.
  mmsynth train t2i --config configs/t2i.yaml --set options.snr_gamma=none --set lr=3e-4
A run folder (--out) holds config.yaml, log.csv, samples/, checkpoints/ and the export final/.
--resume continues exactly from the newest complete checkpoint (same loss and weights as an
uninterrupted run); without it an existing run folder with checkpoints is refused.
Several GPUs/nodes: accelerate launch -m mmsynth.cli.main train RECIPE ...
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with the one trainer (recipes: " + ", ".join(sorted(RECIPES)) + ")",
        description="Train a model with mmsynth's one accelerate trainer and a recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="what to train: " + ", ".join(sorted(RECIPES)))
    p.add_argument("--config", metavar="FILE", help="YAML config (e.g. configs/t2i.yaml)")
    p.add_argument("--max-steps", type=positive_int, metavar="N", help="optimiser steps in total (also when resuming)")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="examples per process per micro-step")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty DIR: replaces the run's own entries (config.yaml, log.csv, "
                        "samples/, checkpoints/, final/, summary.json) and nothing else")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is still written)")
    p.add_argument("--export-only", action="store_true",
                   help="write DIR/final from the newest checkpoint (EMA weights) and train nothing; "
                        "safe while the run is still training")  # fmt: skip
    p.add_argument("--max-minutes", type=positive_float, metavar="M",
                   help="stop after M minutes of wall time (set-up included) with a checkpoint at that step and no "
                        "export; --resume continues it (for a GPU call or batch slot of fixed length)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmsynth.errors import InputError
    from mmsynth.train.config import load_config, parse_set
    from mmsynth.train.recipes import get_recipe
    from mmsynth.train.trainer import train

    recipe_cls = get_recipe(args.recipe)
    overrides = parse_set(args.set)
    for key, value in (("max_steps", args.max_steps), ("batch_size", args.batch_size), ("out", args.out)):
        if value is not None:
            if key in overrides:  # never silently one of two values
                raise InputError(f"--{key.replace('_', '-')} and --set {key}= both give {key}; give it once")
            overrides[key] = value
    config, options = load_config(recipe_cls, args.config, overrides)
    result = train(config, options, resume=args.resume, progress=not args.no_progress, export_only=args.export_only,
                   time_limit_s=None if args.max_minutes is None else 60.0 * args.max_minutes,
                   overwrite=args.overwrite)  # fmt: skip
    if args.export_only:
        print(f"exported {config.recipe} at step {result.step} to {result.export}")
        return 0
    if result.step < config.max_steps:
        print(f"stopped {config.recipe} at step {result.step} of {config.max_steps} (--max-minutes "
              f"{args.max_minutes:g}), checkpoint in {config.out}/checkpoints: continue with --resume, or write "
              f"{result.export} from it with --export-only")  # fmt: skip
        return 0
    print(
        f"trained {config.recipe} to step {result.step} (last loss {result.last_loss:.4f}, "
        f"{result.seconds_per_step:.2f} s/step); exported to {result.export}"
    )
    return 0
