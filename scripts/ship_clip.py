"""Ship a CLIP stage's export into a bundle as clip/, measured, with the bundle card's Components section rewritten.

    python scripts/ship_clip.py --run runs/clip_vision_deep [--out models/shapes-v1] [--n 1000] [--val-seed 7]
        [--command "mmsynth train clip --config configs/clip_vision_deep.yaml"]

A CLIP stage trained with options.freeze_text leaves the text tower, which is the UNet's text encoder, bit for bit
as it was, so every text-to-image figure of the card still stands and only the components need measuring again.
Steps: refuse (nothing written) unless the run's text tower is the bundle's text encoder; copy the bundle to a
temporary folder with clip/ replaced by the run's CLIP in float16; `mmsynth bench components` there; refuse unless
caption-consistent retrieval beats the bundle's metrics_components.json (--allow-worse ships anyway) and reaches
--at-least (a stage that adds weight to the budget should earn it: a bar, not a gain within the noise; one that adds
weight without --at-least is refused before it is measured); rewrite the
card's weights line, its quote of the parts' training table (from --parts) and its Components section (the
figures, the command, the run's record with the training command and the options it set, and with --val-seed the
same bench on the val split) and metrics_components.json (with --val-seed, val under `clip_val`, which the next
stage's card quotes as "before it"); rename the folder into place.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from mmsynth.cli.main import main as mmsynth
from mmsynth.evaluate.components import with_interval
from mmsynth.io import replace_dir
from mmsynth.models.bundle import CLIP_FOLDER, load_component, save_components
from mmsynth.train.config import TrainConfig, to_dict
from mmsynth.train.recipes.clip import ClipOptions


def _ship_zoo():
    spec = importlib.util.spec_from_file_location("ship_zoo", Path(__file__).with_name("ship_zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_options(options: dict) -> dict:
    """The clip options a run set away from the recipe's defaults: what the card needs to say about how it ran.
    The defaults are compared in the form the trainer writes a run's config.yaml in (to_dict)."""
    defaults = to_dict(TrainConfig(), ClipOptions())["options"]
    return {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}


def clip_record(record: dict, clip_config: dict, before: dict | None, command: str = "mmsynth train clip",
                before_val: dict | None = None) -> str:  # fmt: skip
    """One paragraph on what clip/ is: the run, how it was trained, its steps and time, the towers' shape, and the
    retrieval before (on test, and on val where the shipped metrics have it: `clip_val`)."""
    import yaml

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


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/clip_vision_deep", help="the CLIP run folder (its export: RUN/final)")
    p.add_argument("--out", default="models/shapes-v1", help="the bundle whose clip/ is replaced")
    p.add_argument("--n", type=int, default=1000, help="test pairs for VAE PSNR / CLIP retrieval (default 1000)")
    p.add_argument("--reports", default="runs/ship", help="where the components JSON goes")
    p.add_argument("--allow-worse", action="store_true", help="ship even if retrieval does not beat the shipped CLIP")
    p.add_argument("--at-least", type=float, default=None,
                   help="refuse unless test retrieval reaches this too (e.g. 0.90 for a stage that adds weight)")
    p.add_argument("--parts", default="docs/zoo_parts.md",
                   help="the parts' record whose training table the card quotes (update it first)")  # fmt: skip
    p.add_argument("--command", default="mmsynth train clip", help="the command that trained the run, for the card")
    p.add_argument("--val-seed", type=int, default=None,
                   help="also measure retrieval on the val split with this seed and put it on the card")  # fmt: skip
    a = p.parse_args(argv)

    ship = _ship_zoo()
    run, out, reports = Path(a.run), Path(a.out), Path(a.reports)
    export = run / "final"
    if not (export / CLIP_FOLDER / "config.json").is_file():
        sys.exit(f"ship_clip: {export / CLIP_FOLDER} is missing; train with `mmsynth train clip` (or --export-only)")
    if not (out / "model_index.json").is_file():
        sys.exit(f"ship_clip: {out} is not a bundle (no model_index.json)")
    ship._check_same_text_tower(out, export)
    metrics = out / "metrics_components.json"
    shipped = json.loads(metrics.read_text()) if metrics.is_file() else {}
    before, before_val = shipped.get("clip"), shipped.get("clip_val")
    reports.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.shipping")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp, ignore=shutil.ignore_patterns(CLIP_FOLDER))
    staged = save_components(reports / "clip_float16", dtype=torch.float16, clip=load_component(export, CLIP_FOLDER))
    shutil.copytree(staged / CLIP_FOLDER, tmp / CLIP_FOLDER)  # (save_components replaces the folder it writes)
    added = _weight_bytes(tmp / CLIP_FOLDER) - _weight_bytes(out / CLIP_FOLDER)
    if why := weight_refusal(added, a.at_least, a.allow_worse):
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"ship_clip: {why}")
    json_out, val_out = reports / "components.json", reports / "components_val.json"
    benches = [(json_out, [])]
    if a.val_seed is not None:
        benches.append((val_out, ["--split", "val", "--seed", str(a.val_seed)]))
    for path, split in benches:
        bench = ["bench", "components", "--model", str(tmp), "--n", str(a.n), "--json", str(path), "--overwrite",
                 *split]
        print("$ mmsynth " + " ".join(bench), flush=True)
        if mmsynth(bench) != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            sys.exit("ship_clip: the components bench failed")
    scores = json.loads(json_out.read_text())
    new, old = scores["clip"]["top1_consistent"]["value"], (before or {}).get("top1_consistent", {}).get("value")
    if why := refusal(new, old, a.at_least, a.allow_worse):
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"ship_clip: {why}")
    if a.val_seed is not None:  # kept beside test, so the next stage's card can say what val was before it
        scores["clip_val"] = {**json.loads(val_out.read_text())["clip"], "seed": a.val_seed}
    name = json.dumps(str(out))
    (tmp / metrics.name).write_text(json.dumps(scores, indent=2).replace(json.dumps(str(tmp)), name) + "\n",
                                    encoding="utf-8")  # fmt: skip
    record = ship.training_record(run, "clip")
    section = ship.components_lines(scores, f"mmsynth bench components --model {out} --n {a.n}")
    text = clip_record(record, json.loads((export / CLIP_FOLDER / "config.json").read_text()), before, a.command,
                       before_val)  # fmt: skip
    if a.val_seed is not None:
        text += (f" On val (`mmsynth bench components --model {out} --n {a.n} --split val --seed {a.val_seed}`): "
                 f"{with_interval(scores['clip_val']['top1_consistent'])}.")
    section += ["", text]
    card = tmp / "README.md"
    if card.is_file():
        rewritten = rewrite_card(card.read_text(encoding="utf-8"), section, ship.weights_line(tmp))
        parts = ship.parts_training_table(Path(a.parts))
        card.write_text(rewrite_parts_table(rewritten, parts[1]) if parts else rewritten, encoding="utf-8")
    replace_dir(tmp, out)
    print(f"shipped {out / CLIP_FOLDER}: retrieval {new:.3f} (was {old if old is not None else 'n/a'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
