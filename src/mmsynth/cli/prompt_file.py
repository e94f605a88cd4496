"""`mmsynth generate --prompt-file`: many prompts in one run, split across the processes of an `accelerate launch`.

Each prompt is its own request (its own seed), sampled alone, so an image does not depend on which process made it:
every process samples its share (`split_between_processes`), the main one gathers them and writes --out in file order
through generate's own writer (docs/multi-gpu.md). Not a command: generate's `run` hands over to `run_prompt_file`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmsynth.cli import layout_options, model_options
from mmsynth.cli.model_options import Lora
from mmsynth.cli.sampling_options import sampling_kwargs
from mmsynth.errors import InputError
from mmsynth.io import check_output_dir, read_text_file
from mmsynth.models.shipped import DEFAULT_MODEL, resolve_model
from mmsynth.models.sources import model_hash

if TYPE_CHECKING:
    from mmsynth.sample.request import GenerationRequest

HELP = (
    "generate every prompt of FILE, one request each: a text file of one prompt per line, or a .jsonl file of "
    '{"prompt": ..., "negative_prompt": ..., "seed": ...} objects (prompt required); blank lines and lines starting '
    "with # are skipped. Prompt i gets seed --seed + i*n unless its line gives one (-n: images per prompt, default "
    "1 here), --negative-prompt unless its line gives one; every image goes to the one --out, in file order. Under "
    "`accelerate launch` the prompts are split across the processes (docs/multi-gpu.md). Not with --prompt, "
    "--replay or a layout"
)
_PROMPT_KEYS = ("prompt", "negative_prompt", "seed")


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One prompt of a --prompt-file: its text and what its line sets (None: the options' value)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    line: int = 0  # its line in the file, for errors


def read_prompt_file(path: str) -> list[PromptLine]:
    """The prompts of a --prompt-file (format in HELP); InputError naming the file and line."""
    p = Path(path)
    text = read_text_file(p, "--prompt-file")
    jsonl = p.suffix.lower() == ".jsonl"
    out = []
    for k, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(_json_prompt(line, f"--prompt-file '{p}' line {k}", k) if jsonl else PromptLine(line, line=k))
    if not out:
        raise InputError(f"--prompt-file '{p}' has no prompts (blank lines and lines starting with # are skipped)")
    return out


def _json_prompt(line: str, where: str, k: int) -> PromptLine:
    from mmsynth.sample.request import RANGES

    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise InputError(f"{where} is not valid JSON ({why})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise InputError(f'{where} must be a JSON object with a string "prompt", e.g. {{"prompt": "a red circle"}}')
    unknown = sorted(set(data) - set(_PROMPT_KEYS))
    if unknown:
        raise InputError(f"{where} has unknown key(s) {unknown}; valid: {', '.join(_PROMPT_KEYS)}")
    if not isinstance(data.get("negative_prompt", ""), str):
        raise InputError(f'{where}: "negative_prompt" must be a string')
    if data.get("seed") is not None:
        RANGES["seed"].check(data["seed"], f"{where}: seed")
    return PromptLine(data["prompt"], data.get("negative_prompt"), data.get("seed"), k)


@dataclasses.dataclass
class PromptFileRequests:
    """request.json of a --prompt-file run: the file and each prompt's replayable request (requests/ has each
    image's)."""

    prompt_file: str
    requests: list[GenerationRequest]

    def to_json(self) -> str:
        return json.dumps({"prompt_file": self.prompt_file, "requests": [r.to_dict() for r in self.requests]},
                          indent=2)


def prompt_file_requests(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One copy of the options per prompt of --prompt-file, each with its prompt, negative prompt, seed and n (what
    `build_request` reads); the files' and options' errors before any model loads."""
    from mmsynth.sample.request import RANGES

    clash = [flag for flag, value in (("--prompt", args.prompt), ("--replay", args.replay)) if value is not None]
    if clash:
        raise InputError(f"--prompt-file gives the prompts; do not combine it with {clash[0]}")
    layout = [f"--{o.replace('_', '-')}" for o in layout_options.OPTION_NAMES if getattr(args, o) is not None]
    if layout:
        raise InputError(f"--prompt-file takes no layout ({layout[0]}): a layout is drawn for one prompt")
    entries = read_prompt_file(args.prompt_file)
    n = 1 if args.n is None else args.n
    base = sampling_kwargs(args)["seed"]
    lines = []
    for i, entry in enumerate(entries):
        seed = base + i * n if entry.seed is None else entry.seed
        RANGES["seed"].check(seed, f"--prompt-file '{args.prompt_file}' line {entry.line}: seed (--seed + {i} x n)")
        negative = args.negative_prompt if entry.negative_prompt is None else entry.negative_prompt
        lines.append(argparse.Namespace(**{**vars(args), "prompt": entry.prompt, "negative_prompt": negative,
                                           "seed": seed, "n": n, "prompt_file": None}))
    return lines


def run_prompt_file(args: argparse.Namespace) -> int:
    """Each prompt of --prompt-file sampled alone (its own seed), this process's share of them under `accelerate
    launch` (split_between_processes); the main process gathers every image and writes --out in file order."""
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from mmsynth.cli.arguments import resolve_device
    from mmsynth.cli.generate import build_request, recorded, run_eval, sample_built, write_outputs
    from mmsynth.sample.distributed import Distributed

    out = check_output_dir(args.out, overwrite=args.overwrite)
    lines = prompt_file_requests(args)
    first, _ = build_request(lines[0])  # the options' own errors (controls, sizes, LoRAs), on every process
    dist = Distributed.from_env(resolve_device(args.device))
    if dist.device is not None:  # each process on the device accelerate gives it (cuda:LOCAL_RANK)
        args.device = dist.device
    mine = dist.split(lines)
    if dist.world > 1 and not args.quiet:
        print(f"mmsynth generate: process {dist.rank} of {dist.world}: {len(mine)} of {len(lines)} prompt(s)",
              file=sys.stderr)
    part = []
    if mine:
        source = resolve_model(first.model or DEFAULT_MODEL)
        digest = model_hash(source)
        loras = [Lora.checked(x["path"], x["scale"]) for x in first.loras]
        bundle = model_options.load_bundle(args, str(source), loras)
        for i, line in tqdm(mine, desc="prompts", disable=args.quiet or not dist.is_main):
            request, controls = build_request(line)
            model_options.check_lora_reach(bundle, controls, request.loras)
            request.model_hash, request.dtype = digest, model_options.dtype_name(bundle.dtype)
            result = sample_built(bundle, request, controls, progress=False)
            part.append((i, (result.images, result.requests, result.selection, recorded(request, result))))
    done = dist.collect(part, len(lines))
    if not dist.is_main:
        return 0
    merged = SimpleNamespace(images=np.concatenate([d[0] for d in done]), requests=[r for d in done for r in d[1]],
                             selection=None if done[0][2] is None else [s for d in done for s in d[2]])
    write_outputs(out, merged, PromptFileRequests(args.prompt_file, [d[3] for d in done]), args.overwrite)
    where = f" on {dist.world} processes" if dist.world > 1 else ""
    print(f"wrote {len(merged.images)} image(s) of {len(lines)} prompt(s){where}, grid.png, requests and "
          f"metadata.jsonl to {out}")
    if args.eval:
        run_eval(out)
    return 0
