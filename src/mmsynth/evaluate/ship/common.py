"""What every part of a zoo shipment shares: the training record a card quotes, the weight summary and the checks made
before anything is written. Each part builds the new bundle in `io.atomic_dir(out, whole=True)`, which replaces --out
only when the shipment succeeds (a refusal, an error or Ctrl-C leaves it as it was and no temporary folder)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mmsynth.errors import InputError
from mmsynth.evaluate.components import miss_lines, with_interval
from mmsynth.io import check_output_file
from mmsynth.models.bundle import INPAINTING_UNET
from mmsynth.train.recipes.t2i import BASE_CARD

# Runs the bench command line it is given (`mmsynth bench ...` without `mmsynth`) and returns its exit code. Shipping
# runs the very commands its cards quote, so anyone can rerun a figure; the CLI passes its own entry point in, so this
# layer never imports the CLI.
Bench = Callable[[Sequence[str]], int]

INPAINTING_NOTE = (f"`{INPAINTING_UNET}/` holds an inpainting UNet (Stable Diffusion inpainting's 9-channel input), "
                   f"fine-tuned from this UNet; its card is `{INPAINTING_UNET}/README.md` "
                   "(`mmsynth zoo ship inpainting`).")  # fmt: skip


CONTROL_CLASSES = {"ControlNetModel": "ControlNet", "T2IAdapter": "T2I-Adapter"}


def control_note(bundle: Path) -> str | None:
    """The bundle card's line listing its control components (`mmsynth zoo ship control`, `zoo ship gligen`), None
    when it has none: every shipment that rewrites the card keeps it (ship t2i keeps the components themselves)."""
    from mmsynth.models.bundle import named_components

    found = [(name, CONTROL_CLASSES[e["class"]] if e.get("class") in CONTROL_CLASSES else "GLIGEN layers over unet/")
             for name, e in sorted(named_components(bundle).items())
             if e.get("class") in CONTROL_CLASSES or e.get("base")]  # fmt: skip
    if not found:
        return None
    return ("Control components: " + ", ".join(f"`{name}/` ({kind})" for name, kind in found) + "; each has its card, "
            "`NAME/README.md` (`mmsynth zoo ship control|gligen`), and the sampler's `controlnet` / `t2i-adapter` / "
            "`gligen` control names it as its `model`.")


def run_bench(bench: Bench, args: list[str]) -> None:
    """Run one bench command line, echoed as a user would type it; a failure stops the shipment (nothing shipped)."""
    print("$ mmsynth " + " ".join(args), flush=True)
    code = bench(args)
    if code == 130:  # Ctrl-C inside the bench: stop as an interrupt (the staging folder goes), not as bad input
        raise KeyboardInterrupt
    if code != 0:
        raise InputError(f"`mmsynth {' '.join(args)}` failed with exit code {code}; nothing shipped")


def require_bundle(folder: Path, what: str, hint: str) -> None:
    """Refuse `folder` unless it is a text-to-image bundle (a diffusers model_index.json)."""
    if not (folder / "model_index.json").is_file():
        raise InputError(f"{what} '{folder}' is not a model bundle (no model_index.json); {hint}")


def require_parts(path: Path | None) -> None:
    """Refuse a parts' record that is missing: the card quotes its training table, so it must exist to be quoted."""
    if path is not None and not path.is_file():
        raise InputError(f"--parts '{path}' does not exist or is not a file (run from the repository root, name the "
                         "record with --parts FILE, or pass --no-parts)")


def check_reports(reports: Path, names: Sequence[str], overwrite: bool) -> list[Path]:
    """The JSON files a shipment's bench runs write under --reports, checked before any work."""
    return [check_output_file(reports / name, "--reports", suffixes=(".json",), overwrite=overwrite) for name in names]


def bench_overwrite(overwrite: bool) -> list[str]:
    """The bench's own --overwrite, passed on only when the shipment was given it (its outputs were checked)."""
    return ["--overwrite"] if overwrite else []


def check_same_text_tower(bundle: Path, clip_dir: Path) -> None:
    """Refuse a CLIP whose text tower is not the bundle's text encoder bit for bit: every text-to-image figure of the
    card was measured with that encoder, and the CLIP's text tower is that encoder in the zoo."""
    from mmsynth.models.bundle import load_component

    text_encoder = load_component(bundle, "text_encoder")
    clip = load_component(clip_dir, "clip")
    a = getattr(text_encoder, "text_model", text_encoder).state_dict()  # transformers 5 flattened CLIPTextModel
    b = clip.text_model.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    if not same:
        raise InputError(f"the text tower of {clip_dir}/clip is not the bundle's text encoder; train it with "
                         "options.freeze_text=true from the CLIP the UNet was trained on (for a text encoder trained "
                         "with the UNet, add options.text_encoder=BUNDLE) and pass it as --clip")  # fmt: skip


def copy_into(src: Path, tmp: Path, skip: Sequence[str] = ()) -> None:
    """Copy bundle `src` into the (empty) staging folder, leaving out the top-level entries named in `skip`."""
    shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip) if skip else None)


def named_as_shipped(text: str, tmp: Path, out: Path) -> str:
    """A bench report's text with the staging folder it measured renamed to the folder it ships in."""
    return text.replace(json.dumps(str(tmp)), json.dumps(str(out)))


def run_folders(runs: Path, bundle: Path, recipes: Sequence[str] = ("clip", "vae", "t2i", "clip_vision")
                ) -> dict[str, Path]:  # fmt: skip
    """The training run of each recipe: runs/RECIPE, except that the t2i run is the one --bundle was exported from
    (runs/t2i_deep/final comes from runs/t2i_deep), when that folder is a t2i run."""
    folders = {r: runs / r for r in recipes if (runs / r).is_dir()}
    config = bundle.parent / "config.yaml"
    if config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("recipe") == "t2i":
        folders["t2i"] = bundle.parent
    return folders


def training_record(folder: Path, recipe: str) -> dict[str, Any]:
    """Steps, batch, examples seen, logged wall time and last metrics of one training run (its folder)."""
    rec: dict[str, Any] = {"recipe": recipe, "folder": str(folder)}
    if (folder / "config.yaml").exists():
        rec["config"] = (folder / "config.yaml").read_text()
    if (folder / "summary.json").exists():
        rec.update(json.loads((folder / "summary.json").read_text()))
    options = (yaml.safe_load(rec.get("config") or "{}") or {}).get("options", {})
    if options.get("base"):
        rec["base"] = str(options["base"])
    if options.get("attention_depth"):
        rec["attention_depth"] = [int(d) for d in options["attention_depth"]]
    log = folder / "log.csv"
    if log.exists():
        rows = list(csv.DictReader(log.open()))
        if rows:
            prev, wall = 0, 0.0
            for r in rows:  # each row covers the steps since the previous one
                step = int(r["step"])
                wall += (step - prev) * float(r["sec_per_step"])
                prev = step
            rec["logged_wall_h"] = wall / 3600
            rec["last_log"] = rows[-1]
    return rec


def base_card(rec: dict[str, Any]) -> Path:
    """The card of the weights a run started from: the copy the run kept when it began, else the base's own.

    The base's own card is wrong once the run's weights were shipped over it (it counts the run already)."""
    kept = Path(rec["folder"]) / BASE_CARD
    return kept if kept.is_file() else Path(rec["base"]) / "README.md"


def earlier_training(card: Path, recipe: str) -> dict[str, Any] | None:
    """Steps and logged wall time of RECIPE in an earlier model card (the bundle a run was fine-tuned from)."""
    if not card.exists():
        return None
    for line in card.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0] == recipe and cells[1].isdigit() and cells[6].endswith(" h"):
            return {"step": int(cells[1]), "logged_wall_h": float(cells[6][:-2])}
    return None


def parts_training_table(card: Path) -> tuple[str, list[str]] | None:
    """The 'How they were trained' section of the parts' record (docs/zoo_parts.md), to quote in the card."""
    if not card.exists():
        return None
    lines, keep = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = line.startswith("## How they were trained")
            continue
        if keep:
            lines.append(line)
    return str(card), lines


def tensor_summary(bundle: Path) -> tuple[set[str], dict[str, int]]:
    """The dtypes of every shipped tensor and the parameter count of each component folder, read once from the
    safetensors headers."""
    from safetensors import safe_open

    dtypes: set[str] = set()
    counts: dict[str, int] = {}
    for f in sorted(bundle.rglob("*.safetensors")):
        part = f.relative_to(bundle).parts[0]
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = st.get_slice(k)
                dtypes.add(str(tensor.get_dtype()))
                counts[part] = counts.get(part, 0) + int(torch.Size(tensor.get_shape()).numel())
    return dtypes, counts


def weight_bytes(folder: Path) -> int:
    """Bytes of safetensors under `folder`: the zoo's weight budget counts these."""
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def weights_line(bundle: Path) -> str:
    """The card's weight total, as every part's shipment writes it."""
    dtypes, _ = tensor_summary(bundle)
    return f"Weights: {weight_bytes(bundle) / 2**20:.1f} MiB of safetensors ({', '.join(sorted(dtypes))})."


def architecture(bundle: Path, counts: dict[str, int]) -> list[str]:
    """Parameters per component (`tensor_summary`'s counts) and the UNet's shape from its config."""
    counts = {part: counts[part] for part in ("unet", "vae", "text_encoder", "clip") if counts.get(part)}
    lines = ["Parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) + "."]
    config = bundle / "unet" / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        lines[0] += (f" UNet: channels {'/'.join(map(str, c['block_out_channels']))}, {c['layers_per_block']} "
                     f"resnet(s) per level, transformer layers per level {c['transformer_layers_per_block']} "
                     f"(up path {c.get('reverse_transformer_layers_per_block') or 'mirrored'}), cross-attention "
                     f"width {c['cross_attention_dim']}.")  # fmt: skip
    return lines


def metric_cell(d: dict[str, Any], suite: str, row: str, name: str) -> str:
    """One cell of a card's table from a bench report (its `results` and `intervals`): "0.634 [0.591, 0.675]"."""
    v = d["results"][suite][row].get(name)
    if v is None:
        return "n/a"
    ci = d["intervals"][suite][row].get(name)
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def components_lines(components: dict[str, Any], command: str) -> list[str]:
    """The card's Components section from `mmsynth bench components` JSON: VAE PSNR, CLIP retrieval (exact and
    caption-consistent, by caption kind), what the wrong retrievals got wrong and the text side's ceiling."""
    v, c = components.get("vae", {}).get("psnr_db"), components.get("clip", {})
    lines = ["## Components", "", f"`{command}`", ""]
    if v:
        psnr = with_interval(v, 2, " dB", f", n={v['n']} test renders; bar >= 30 dB")
        lines.append(f"- VAE reconstruction PSNR: {psnr}")
    for key in ("top1_exact", "top1_consistent"):
        if key in c:
            r = c[key]
            lines.append(f"- CLIP text->image retrieval {key}: " + with_interval(r, then=f", n={r['n']}; bar >= 0.90"))
    if c.get("consistent_by_kind"):
        lines.append("- top1_consistent by caption: " + ", ".join(
            f"{k} {r['value']:.3f} (n={r['n']})" for k, r in c["consistent_by_kind"].items()))  # fmt: skip
    if "misses" in c:
        lines += ["- " + line for line in miss_lines(c)]
    if "text_side_ceiling" in c:
        lines.append("- text-side ceiling (retrieval against images embedded from their scenes' other captions: "
                     "their mean, or vectors fitted to them; what a perfect vision side could reach): " + ", ".join(
                         f"{k} {r['value']:.3f}" for k, r in c["text_side_ceiling"].items()))  # fmt: skip
    return lines
