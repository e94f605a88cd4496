"""Average the weights of CLIP stages fine-tuned from one start (a model soup, Wortsman et al. 2022) into one CLIP.

    python experiments/probes/soup_clip.py --runs runs/A/final runs/B/final ... --out runs/clip_soup/final
        [--greedy --split val --seed 7 --n 1000]

Why: the zoo's CLIP stages after the seventh each trained the same vision tower on (other scenes, other hard
negatives, other losses) and none beat it alone; stages fine-tuned from one start tend to sit in one basin, where
their mean is often better than each of them, at no training cost and no weight cost. The soup keeps the text
tower: every ingredient must have the same architecture and a text tower equal to the first's (trained with
options.freeze_text), so the UNet's text encoder stays bit for bit.

--greedy: Wortsman's greedy soup. Score each ingredient alone by caption-consistent retrieval on --split (choose
val, so the test split stays unseen), then, best first, keep an ingredient only if the mean with it scores higher
than without. Without --greedy: the uniform mean of all. Writes clip/, text_encoder/, tokenizer/ (the first
ingredient's) and soup.json (ingredients, their scores, the kept ones), like a `mmsynth train clip` export, so
`mmsynth bench components --model` takes it. Bad input (a missing export, mismatched stages) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from mmsynth.errors import InputError
from mmsynth.io import write_json
from mmsynth.models.bundle import load_component, save_components


def load_ingredients(runs: list[str]) -> list[Any]:
    """The runs' CLIPs in float32; refuses any whose shape or text tower differs from the first's."""
    clips = [load_component(r, "clip").float().eval() for r in runs]
    first = clips[0]
    text_keys = [k for k in first.state_dict() if k.startswith(("text_model.", "text_projection."))]
    for run, clip in zip(runs[1:], clips[1:]):
        if clip.config.to_dict()["vision_config"] != first.config.to_dict()["vision_config"]:
            raise InputError(f"--runs: {run}'s vision tower is shaped unlike {runs[0]}'s; a soup needs one shape")
        state, ref = clip.state_dict(), first.state_dict()
        if state.keys() != ref.keys() or any(not torch.equal(state[k], ref[k]) for k in text_keys):
            raise InputError(f"--runs: {run}'s text tower differs from {runs[0]}'s; soup only stages trained with "
                             "options.freeze_text from one text tower (it is the UNet's text encoder)")
    return clips


def average(clips: list[Any]) -> Any:
    """A copy of the first CLIP holding the mean of all their floating-point weights."""
    import copy

    soup = copy.deepcopy(clips[0])
    states = [c.state_dict() for c in clips]
    mean = {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v)
            for k, v in states[0].items()}  # fmt: skip
    soup.load_state_dict(mean)
    return soup.eval()


def score(clip: Any, tokenizer: Any, n: int, split: str, seed: int) -> float:
    """Caption-consistent text->image retrieval top-1 among n scenes of split."""
    from mmsynth.evaluate.components import clip_retrieval

    return float(clip_retrieval(clip, tokenizer, n=n, split=split, seed=seed)["top1_consistent"]["value"])


def greedy_soup(runs: list[str], clips: list[Any], tokenizer: Any, n: int, split: str, seed: int
                ) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Wortsman's greedy soup: ingredients best first, each kept only if the mean with it scores higher."""
    alone = {r: score(c, tokenizer, n, split, seed) for r, c in zip(runs, clips)}
    order = sorted(range(len(runs)), key=lambda i: -alone[runs[i]])
    kept, best = [order[0]], alone[runs[order[0]]]
    steps = []
    for i in order[1:]:
        trial = score(average([clips[j] for j in [*kept, i]]), tokenizer, n, split, seed)
        steps.append({"add": runs[i], "score": trial, "kept": trial > best})
        if trial > best:
            kept, best = [*kept, i], trial
    record = {"alone": alone, "steps": steps, "kept": [runs[i] for i in kept], "score": best}
    return average([clips[i] for i in kept]), record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="CLIP exports (folders with clip/, text_encoder/, "
                   "tokenizer/) fine-tuned from one start; the first gives the text tower and tokenizer")
    p.add_argument("--out", required=True, help="folder to write the soup to (a CLIP export)")
    p.add_argument("--greedy", action="store_true", help="greedy soup selected on --split (default: uniform mean)")
    p.add_argument("--split", default="val", help="split the greedy soup is selected on (default val)")
    p.add_argument("--seed", type=int, default=7, help="scene seed of that split (default 7)")
    p.add_argument("--n", type=int, default=1000, help="scenes it is selected on (default 1000)")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        raise InputError("--runs: a soup needs at least two CLIP exports")
    clips = load_ingredients(args.runs)
    tokenizer = load_component(args.runs[0], "tokenizer")
    if args.greedy:
        soup, record = greedy_soup(args.runs, clips, tokenizer, args.n, args.split, args.seed)
        record.update(split=args.split, seed=args.seed, n=args.n)
    else:
        soup, record = average(clips), {"kept": list(args.runs)}
    out = save_components(args.out, clip=soup, text_encoder=load_component(args.runs[0], "text_encoder"),
                          tokenizer=tokenizer)  # fmt: skip
    write_json({"method": "greedy" if args.greedy else "uniform", **record}, out / "soup.json")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except InputError as exc:
        sys.exit(print(f"soup_clip: {exc}", file=sys.stderr) or 2)
