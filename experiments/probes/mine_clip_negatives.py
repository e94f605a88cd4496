"""Mine the training scenes a trained CLIP confuses, for a CLIP stage's `options.mined_negatives`.

    python experiments/probes/mine_clip_negatives.py --model models/shapes-v1 --seed 17 --sources 40000
        --out runs/mined/s17.npz [--split train --group 2 --per-source 2 --batch-size 128]

Why: the shipped CLIP's retrieval misses are scenes close to the query's own (a shape or a binding different),
which random batch scenes rarely are and one-word synthetic edits only sometimes. For each hard-negative
group's source (scene index 0, group, 2 group, ... of the split and seed the stage will train on), this keeps
the other sources that the CLIP scores highest against the source's captions while none of them is true
(`train/mining.py`), so the stage's batches hold the CLIP's own confusions. --batch-size is the stage's: a
batch's groups never share a scene.
Bad input (a missing model, a bad number) exits 2 with one line.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from mmsynth.errors import InputError
from mmsynth.models.bundle import load_component
from mmsynth.train.mining import mine_confusions, save_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder with clip/ and tokenizer/ (a bundle or a clip export)")
    p.add_argument("--out", required=True, help=".npz file to write the table to")
    p.add_argument("--split", default="train", help="split the stage trains on (default train)")
    p.add_argument("--seed", type=int, required=True, help="the stage's data_seed")
    p.add_argument("--sources", type=int, default=40000, help="groups to mine for (one per group the stage reads)")
    p.add_argument("--group", type=int, default=2, help="the stage's options.hard_negative_group (default 2)")
    p.add_argument("--per-source", type=int, default=2, help="neighbours kept per source: the stage's "
                   "options.mined_per_group or more (default 2)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128, help="the stage's batch_size (default 128)")
    args = p.parse_args(argv)
    for name in ("sources", "group", "per_source", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    size = args.group + args.per_source
    if args.batch_size % size:
        raise InputError(f"--batch-size must be a multiple of --group + --per-source ({size}), got {args.batch_size}")
    clip = load_component(args.model, "clip", torch_dtype=torch.float32)
    tokenizer = load_component(args.model, "tokenizer")
    with tqdm(total=args.sources, desc="embedding sources", unit="scene") as bar:
        table = mine_confusions(clip, tokenizer, args.split, args.seed, args.sources, group=args.group,
                                per_source=args.per_source, block=args.batch_size // size, progress=bar.update)
    print(f"wrote {save_table(table, args.out)}: {args.sources} sources x {args.per_source} neighbours")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except InputError as exc:
        sys.exit(print(f"mine_clip_negatives: {exc}", file=sys.stderr) or 2)
