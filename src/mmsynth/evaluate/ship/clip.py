"""`mmsynth zoo ship clip`: put a CLIP stage's export into a bundle as clip/, measured, with the card's Components
section rewritten.

A CLIP stage trained with options.freeze_text leaves the text tower, which is the UNet's text encoder, bit for bit as
it was, so every text-to-image figure of the card still stands and only the components need measuring again. Steps:
refuse (nothing written) unless the run's text tower is the bundle's text encoder; copy the bundle to a temporary
folder with clip/ replaced by the run's CLIP in float16; `mmsynth bench components` there; refuse unless
caption-consistent retrieval beats the bundle's metrics_components.json (--allow-worse ships anyway) and reaches
--at-least (a stage that adds weight to the budget must name the figure it has to earn: a bar, not a gain within the
noise; one that adds weight without --at-least is refused before it is measured); rewrite the card's weights line, its
quote of the parts' training table and its Components section (the figures, the command, the run's record with the
training command and the options it set, and with --val-seed the same bench on the val split) and
metrics_components.json (with --val-seed, val under `clip_val`, which the next stage's card quotes as "before it");
rename the folder into place.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from mmsynth.errors import InputError
from mmsynth.evaluate.components import with_interval
from mmsynth.evaluate.ship.common import (
    Bench,
    bench_overwrite,
    check_reports,
    check_same_text_tower,
    components_lines,
    copy_into,
    named_as_shipped,
    parts_training_table,
    require_bundle,
    require_parts,
    run_bench,
    training_record,
    weight_bytes,
    weights_line,
)
from mmsynth.io import atomic_dir
from mmsynth.models.bundle import CLIP_FOLDER, load_component, save_components
from mmsynth.train.config import TrainConfig, to_dict
from mmsynth.train.recipes.clip import ClipOptions


def set_options(options: dict[str, Any]) -> dict[str, Any]:
    """The clip options a run set away from the recipe's defaults: what the card needs to say about how it ran.
    The defaults are compared in the form the trainer writes a run's config.yaml in (to_dict)."""
    defaults = to_dict(TrainConfig(), ClipOptions())["options"]
    return {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}


def clip_record(record: dict[str, Any], clip_config: dict[str, Any], before: dict[str, Any] | None,
                command: str = "mmsynth train clip", before_val: dict[str, Any] | None = None) -> str:
    """One paragraph on what clip/ is: the run, how it was trained, its steps and time, the towers' shape, and the
    retrieval before (on test, and on val where the shipped metrics have it: `clip_val`)."""
    config = yaml.safe_load(record.get("config") or "{}") or {}
    last = record.get("last_log", {})
    vision = clip_config.get("vision_config", {})
    shown = ", ".join(f"{k} {float(v):.4g}" for k, v in last.items() if k in ("loss", "t2i_top1_in_batch"))
    run = ", ".join(f"{k} {config[k]}" for k in ("lr", "data_seed") if k in config)
    text = (f"`clip/` is the run in `{record['folder']}` (`{command}`; options set: "
            f"{json.dumps(set_options(config.get('options', {})))}{'; ' + run if run else ''}): "
            f"{record.get('step', last.get('step', '?'))} steps of "
            f"{config.get('batch_size', '?')}, {record.get('logged_wall_h', 0):.2f} h logged on "
            f"{platform.machine()} ({torch.get_num_threads()} CPU threads), last logged {shown or 'n/a'}; vision "
            f"tower {vision.get('num_hidden_layers', '?')} layers of {vision.get('hidden_size', '?')}, patch "
            f"{vision.get('patch_size', '?')}. Its text tower is `text_encoder/` bit for bit (checked when shipped), "
            "so the text-to-image figures above do not depend on it. The earlier CLIP stages: `docs/zoo_parts.md`.")
    if before and "top1_consistent" in before:
        text += f" Caption-consistent retrieval before it: {with_interval(before['top1_consistent'])}"
        v = (before_val or {}).get("top1_consistent")
        text += f", {v['value']:.3f} on val." if v else "."
    return text


def rewrite_card(card: str, components_section: list[str], weights: str) -> str:
    """The card with its weights line and its Components section (up to the next `## ` heading) replaced."""
    card = re.sub(r"^Weights: .*$", weights, card, count=1, flags=re.MULTILINE)
    section = "\n".join(components_section) + "\n\n"
    found = re.search(r"^## Components\n.*?(?=^## )", card, flags=re.MULTILINE | re.DOTALL)
    if found:
        return card[: found.start()] + section + card[found.end() :]
    head, sep, rest = card.partition("\n## Training")
    return f"{head.rstrip()}\n\n{section}{sep.lstrip(chr(10))}{rest}" if sep else f"{card.rstrip()}\n\n{section}"


def rewrite_parts_table(card: str, table: list[str]) -> str:
    """The card with the parts' training table it quotes (after "..., as follows:", up to "Reproduce:") replaced by
    the record's current one, so the card lists the CLIP stage just shipped; a card without it is returned as is."""
    found = re.search(r"(?<=, as follows:\n).*?(?=^Reproduce: )", card, flags=re.MULTILINE | re.DOTALL)
    if not found:
        return card
    return card[: found.start()] + "\n".join(["", *table]).rstrip() + "\n\n\n" + card[found.end() :]


def refusal(new: float, old: float | None, at_least: float | None = None, allow_worse: bool = False) -> str | None:
    """Why a stage with test retrieval `new` is not shipped over the shipped `old` (None: it ships)."""
    if at_least is not None and new < at_least:
        return f"retrieval {new:.3f} is below --at-least {at_least:.3f}; nothing shipped"
    if old is not None and new <= old and not allow_worse:
        return f"retrieval {new:.3f} does not beat the shipped {old:.3f}; nothing shipped (--allow-worse ships anyway)"
    return None


def weight_refusal(added: int, at_least: float | None, allow_worse: bool = False) -> str | None:
    """Why a stage whose clip/ is `added` bytes heavier than the shipped one is not even measured (None: go on).
    Weight is the zoo's scarcest resource (the budget test), so a heavier stage must name the figure it has to
    earn (--at-least, e.g. the bar) rather than ship on a gain within the noise."""
    if added > 0 and at_least is None and not allow_worse:
        return (f"the stage adds {added:,} bytes of weights to {CLIP_FOLDER}/; a heavier stage must earn them: pass "
                "--at-least F (e.g. the bar, 0.90); nothing shipped")
    return None


def ship_clip(run: Path, out: Path, bench: Bench, *, n: int = 1000, reports: Path = Path("runs/ship/clip"),
              allow_worse: bool = False, at_least: float | None = None, parts: Path | None = Path("docs/zoo_parts.md"),
              command: str = "mmsynth train clip", val_seed: int | None = None, overwrite: bool = False
              ) -> float:  # fmt: skip
    """Ship the CLIP of training run `run` (its export RUN/final) into bundle `out`; returns its test retrieval."""
    export = run / "final"
    if not (export / CLIP_FOLDER / "config.json").is_file():
        raise InputError(f"--run '{run}': {export / CLIP_FOLDER} is missing; train with `mmsynth train clip` "
                         "(or --export-only)")  # fmt: skip
    require_bundle(out, "--out", "ship the text-to-image bundle first (`mmsynth zoo ship t2i`)")
    require_parts(parts)
    checked = check_reports(reports, ["components.json", *(["components_val.json"] if val_seed is not None else [])],
                            overwrite)  # fmt: skip
    json_out, val_out = checked[0], (checked[1] if val_seed is not None else None)
    check_same_text_tower(out, export)
    metrics = out / "metrics_components.json"
    shipped = json.loads(metrics.read_text()) if metrics.is_file() else {}
    before, before_val = shipped.get("clip"), shipped.get("clip_val")
    with atomic_dir(out, whole=True) as tmp:
        copy_into(out, tmp, skip=[CLIP_FOLDER])
        with tempfile.TemporaryDirectory(prefix=".clip-float16-", dir=tmp) as staged:
            fp16 = save_components(Path(staged) / "clip", dtype=torch.float16, clip=load_component(export, CLIP_FOLDER))
            shutil.move(fp16 / CLIP_FOLDER, tmp / CLIP_FOLDER)
        added = weight_bytes(tmp / CLIP_FOLDER) - weight_bytes(out / CLIP_FOLDER)
        if why := weight_refusal(added, at_least, allow_worse):
            raise InputError(why)
        benches = [(json_out, [])] + ([(val_out, ["--split", "val", "--seed", str(val_seed)])] if val_out else [])
        for path, split in benches:
            run_bench(bench, ["bench", "components", "--model", str(tmp), "--n", str(n), "--json", str(path), *split,
                              *bench_overwrite(overwrite)])  # fmt: skip
        scores = json.loads(json_out.read_text())
        new, old = scores["clip"]["top1_consistent"]["value"], (before or {}).get("top1_consistent", {}).get("value")
        if why := refusal(new, old, at_least, allow_worse):
            raise InputError(why)
        if val_out is not None:  # kept beside test, so the next stage's card can say what val was before it
            scores["clip_val"] = {**json.loads(val_out.read_text())["clip"], "seed": val_seed}
        (tmp / metrics.name).write_text(named_as_shipped(json.dumps(scores, indent=2), tmp, out) + "\n",
                                        encoding="utf-8")  # fmt: skip
        section = components_lines(scores, f"mmsynth bench components --model {out} --n {n}")
        text = clip_record(training_record(run, "clip"), json.loads((export / CLIP_FOLDER / "config.json").read_text()),
                           before, command, before_val)  # fmt: skip
        if val_out is not None:
            text += (f" On val (`mmsynth bench components --model {out} --n {n} --split val --seed {val_seed}`): "
                     f"{with_interval(scores['clip_val']['top1_consistent'])}.")
        card = tmp / "README.md"
        if card.is_file():
            rewritten = rewrite_card(card.read_text(encoding="utf-8"), [*section, "", text], weights_line(tmp))
            quoted = parts_training_table(parts) if parts is not None else None
            card.write_text(rewrite_parts_table(rewritten, quoted[1]) if quoted else rewritten, encoding="utf-8")
    print(f"shipped {out / CLIP_FOLDER}: retrieval {new:.3f} (was {old if old is not None else 'n/a'})")
    return new
