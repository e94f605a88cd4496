"""Assemble the shipped zoo bundle, measure it, and write its model card.

    python scripts/ship_zoo.py --bundle runs/t2i/final [--clip runs/clip_vision/final] --out models/shapes-v1

Steps (all in a temporary folder beside --out, renamed into place at the end; nothing half-written remains):
1. copy the text-to-image bundle (StableDiffusionPipeline layout, fp16 weights); with --clip, replace its clip/
   by that CLIP, after checking that its text tower is exactly the bundle's text encoder;
2. `mmsynth bench components` (VAE PSNR, CLIP retrieval on --components-n test pairs);
3. `mmsynth bench run --suite t2i --n N` (the judge's bars, >= 500 per category) and a smaller CFG sweep;
4. README.md (the model card): configs, data, steps, hardware, wall time, every metric with its command, and
   the CFG sweep plot (cfg_sweep.png). Bench reports (HTML, grids) go to --reports, not into the bundle.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import yaml

from mmsynth.cli.main import main as mmsynth
from mmsynth.evaluate.components import miss_lines, with_interval
from mmsynth.io import replace_dir
from mmsynth.models.bundle import INPAINTING_UNET, list_components, named_components
from mmsynth.train.recipes.t2i import BASE_CARD

RECIPES = ("clip", "vae", "t2i", "clip_vision")
INPAINTING_NOTE = (f"`{INPAINTING_UNET}/` holds an inpainting UNet (Stable Diffusion inpainting's 9-channel input), "
                   f"fine-tuned from this UNet; its card is `{INPAINTING_UNET}/README.md` "
                   "(scripts/ship_inpainting.py).")
T2I_COLUMNS = ("single_object", "binding", "count", "relation", "heldout", "heldout_binding", "overall")


def _run(args: list[str]) -> None:
    print("$ mmsynth " + " ".join(args), flush=True)
    code = mmsynth(args)
    if code != 0:
        sys.exit(f"ship_zoo: `mmsynth {' '.join(args)}` failed with exit code {code}")


def _check_same_text_tower(bundle: Path, clip_dir: Path) -> None:
    from mmsynth.models.bundle import load_component

    text_encoder = load_component(bundle, "text_encoder")
    clip = load_component(clip_dir, "clip")
    a = getattr(text_encoder, "text_model", text_encoder).state_dict()  # transformers 5 flattened CLIPTextModel
    b = clip.text_model.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    if not same:
        sys.exit(f"ship_zoo: the text tower of {clip_dir}/clip is not the bundle's text encoder; train it with "
                 "options.freeze_text=true from the CLIP the UNet was trained on (for a text encoder trained with "
                 "the UNet, add options.text_encoder=BUNDLE) and pass it as --clip")


def run_folders(runs: Path, bundle: Path) -> dict[str, Path]:
    """The training run of each recipe: runs/RECIPE, except that the t2i run is the one --bundle was exported from
    (runs/t2i_deep/final comes from runs/t2i_deep), when that folder is a t2i run."""
    folders = {r: runs / r for r in RECIPES if (runs / r).is_dir()}
    config = bundle.parent / "config.yaml"
    if config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("recipe") == "t2i":
        folders["t2i"] = bundle.parent
    return folders


def training_record(folder: Path, recipe: str) -> dict:
    """Steps, batch, examples seen, logged wall time and last metrics of one training run (its folder)."""
    rec: dict = {"recipe": recipe, "folder": str(folder)}
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


def base_card(rec: dict) -> Path:
    """The card of the weights a run started from: the copy the run kept when it began, else the base's own.

    The base's own card is wrong once the run's weights were shipped over it (it counts the run already)."""
    kept = Path(rec["folder"]) / BASE_CARD
    return kept if kept.is_file() else Path(rec["base"]) / "README.md"


def earlier_training(card: Path, recipe: str) -> dict | None:
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


def _metric(d: dict, suite: str, row: str, name: str) -> str:
    v = d["results"][suite][row].get(name)
    if v is None:
        return "n/a"
    ci = d["intervals"][suite][row].get(name)
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def components_lines(components: dict, command: str) -> list[str]:
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


def weights_line(bundle: Path) -> str:
    """The card's weight total, as every shipping script writes it."""
    dtypes, _ = tensor_summary(bundle)
    size = sum(f.stat().st_size for f in bundle.rglob("*.safetensors")) / 2**20
    return f"Weights: {size:.1f} MiB of safetensors ({', '.join(sorted(dtypes))})."


def model_card(out: Path, records: list[dict], components: dict, t2i: dict, sweep: dict | None, cmds: dict,
               parts_card: tuple[str, list[str]] | None = None) -> str:
    _, counts = tensor_summary(out)
    lines = ["# shapes-v1: the mmsynth Shapes zoo", "",
             "A miniature Stable Diffusion stack trained from scratch on the procedural Shapes dataset: a word-level "
             "tokenizer, a CLIP (its text tower is the UNet's text encoder), an f=4 AutoencoderKL (64x64x3 <-> "
             "16x16x4) and a latent UNet2DConditionModel. diffusers' `StableDiffusionPipeline.from_pretrained` "
             "loads this folder.", "",
             weights_line(out), "",
             *([INPAINTING_NOTE, ""] if (out / INPAINTING_UNET).is_dir() else []),
             *architecture(out, counts), "",
             "## Quality (the judge on test-split prompts; 95% Wilson intervals)", "",
             f"`{cmds['t2i']}`", "",
             "| row | single object | binding | count | relation | held-out object | held-out binding | overall |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d, row in ((t2i, "ground_truth"), (t2i, "vae_ceiling"), (sweep, "base_uncond"), (t2i, "t2i")):
        if d is not None and row in d["results"]["t2i"]:
            cells = [_metric(d, "t2i", row, c) for c in T2I_COLUMNS]
            n = d["rows"]["t2i"][row]["n_cases"]
            lines.append(f"| {row} (n={n}) | " + " | ".join(cells) + " |")
    lines += ["", "Bars: single object >= 0.95, binding >= 0.85, count >= 0.85, relation >= 0.80. vae_ceiling is the "
              "render through this VAE (the best any latent model here can do); base_uncond (the empty prompt: "
              "chance level) comes from the CFG-sweep run below.", ""]  # fmt: skip
    if sweep is not None:
        lines += ["## Classifier-free guidance scale", "", f"`{cmds['sweep']}`", "", "![cfg sweep](cfg_sweep.png)", "",
                  "| cfg | overall | binding | count | relation |", "|---|---|---|---|---|"]  # fmt: skip
        rows = sweep["rows"]["t2i"]
        pts = sorted((rows[r]["settings"]["cfg"], r) for r in rows if r == "t2i" or r.startswith("t2i["))
        for cfg, r in pts:
            lines.append(f"| {cfg:g} | " + " | ".join(_metric(sweep, "t2i", r, c) for c in
                                                     ("overall", "binding", "count", "relation")) + " |")  # fmt: skip
        lines.append("")
    lines += components_lines(components, cmds["components"])
    lines += ["", "## Training", "",
              f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, no GPU; "
              f"torch {torch.__version__}. Data: Shapes `train` split scenes, captions drawn from 4 true captions "
              "per scene; the held-out colour-shape combinations never appear. `data: shapes` renders every "
              "example (each index seen once); a folder is a latent cache (`mmsynth data cache-latents`: the "
              "scenes' VAE posteriors, visited in seeded per-epoch permutations). Precision and data below are "
              "each run's last settings: a run resumed with other settings says so in the comments of its "
              "configs/*.yaml in the repository.", "",
              "| model | steps | batch | examples seen | precision | data | wall time (logged) | last logged |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for rec in records:
        cfg = rec.get("config", "")
        batch, precision, data = (
            next((ln.split(":", 1)[1].split("#")[0].strip() for ln in cfg.splitlines() if ln.startswith(key)), "?")
            for key in ("batch_size:", "mixed_precision:", "data:")
        )
        steps, wall, earlier = rec.get("step", "?"), rec.get("logged_wall_h", 0), rec.get("earlier")
        if earlier and str(steps).isdigit():  # a fine-tuning run: count the steps of the weights it started from
            steps, wall = int(steps) + earlier["step"], wall + earlier["logged_wall_h"]
        seen = int(steps) * int(batch) if str(steps).isdigit() and batch.isdigit() else "?"
        last = ", ".join(f"{k} {float(v):.4g}" for k, v in rec.get("last_log", {}).items()
                         if k not in ("step", "lr", "sec_per_step", "examples_per_sec"))  # fmt: skip
        lines.append(f"| {rec['recipe']} | {steps} | {batch} | {seen} | {precision} | {data} | "
                     f"{wall:.2f} h | {last} |")  # fmt: skip
    for rec in records:
        if rec.get("earlier"):
            e = rec["earlier"]
            grown = (f", grown first to {tuple(rec['attention_depth'])} transformer layers per UNet level "
                     "(`options.attention_depth`: the new layers start as identities, so step 0 computed what "
                     "the base did)") if rec.get("attention_depth") else ""  # fmt: skip
            lines += ["", f"{rec['recipe']} continued from the weights of {rec['base']} ({e['step']} steps, "
                      f"{e['logged_wall_h']:.2f} h, as its card gave them) with `options.base`{grown}, for "
                      f"{rec['step']} more steps: the optimizer state and the EMA did not carry over (AdamW "
                      "started afresh with a warm-up; the EMA started from those weights). The totals above "
                      "add both runs."]  # fmt: skip
    if parts_card:
        lines += ["", f"The text encoder, tokenizer, CLIP and VAE were trained earlier (their record: "
                  f"`{parts_card[0]}`), as follows:", "", *parts_card[1]]
    t2i_run = next((r["folder"] for r in records if r["recipe"] == "t2i"), "runs/t2i")
    lines += ["", "Reproduce: `bash scripts/train_zoo.sh` (CLIP, VAE, then the UNet, each resumable), then the "
              "continuation runs its configs/*.yaml describe (`options.base`), then "
              f"`python scripts/ship_zoo.py --bundle {t2i_run}/final --out models/shapes-v1`.", ""]  # fmt: skip
    for rec in records:
        if rec.get("config"):
            lines += [f"### {rec['recipe']}: {rec['folder']}/config.yaml (the run as configured)", "", "```yaml",
                      rec["config"].rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="runs/t2i/final", help="the t2i export (default runs/t2i/final)")
    p.add_argument("--clip", default=None, help="a CLIP export to ship instead (same text tower, checked)")
    p.add_argument("--out", default="models/shapes-v1", help="the shipped folder (replaced)")
    p.add_argument("--runs", default="runs", help="training runs folder (configs, logs, wall times)")
    p.add_argument("--parts", default="docs/zoo_parts.md",
                   help="record of the parts the UNet was trained on; its training table is quoted ('' = none)")
    p.add_argument("--reports", default="runs/ship", help="where bench JSON/HTML reports go")
    p.add_argument("--n", type=int, default=500, help="t2i cases per category (default 500)")
    p.add_argument("--sweep-n", type=int, default=100, help="t2i cases per category per CFG value (default 100)")
    p.add_argument("--cfg", default="1,3,7", help="CFG values of the sweep beside the run's own 5")
    p.add_argument("--components-n", type=int, default=1000, help="test pairs for VAE PSNR / CLIP retrieval")
    p.add_argument("--seed", type=int, default=1, help="case seed of the bench runs")
    a = p.parse_args(argv)

    src, out, reports = Path(a.bundle), Path(a.out), Path(a.reports)
    if not (src / "model_index.json").exists():
        sys.exit(f"ship_zoo: {src} is not a t2i bundle (no model_index.json); train it with scripts/train_zoo.sh")
    if a.clip or (src / "clip").is_dir():  # before anything is written; a t2i run that trained its text
        _check_same_text_tower(src, Path(a.clip) if a.clip else src)  # encoder still carries the base's CLIP
    reports.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.shipping")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    # components shipped separately (scripts/ship_inpainting.py) stay, and stay listed
    kept = {name: entry for name, entry in named_components(out).items() if not (tmp / name).exists()}
    for name in kept:
        shutil.copytree(out / name, tmp / name)
    if kept:
        list_components(tmp, kept)
    if a.clip:
        shutil.rmtree(tmp / "clip")
        shutil.copytree(Path(a.clip) / "clip", tmp / "clip")
    name = str(out)
    cmds = {
        "components": f"mmsynth bench components --model {name} --n {a.components_n}",
        "t2i": f"mmsynth bench run --suite t2i --n {a.n} --seed {a.seed} --model {name} "
               "--rows ground_truth,vae_ceiling,t2i",
        "sweep": f"mmsynth bench run --suite t2i --n {a.sweep_n} --seed {a.seed + 1} --model {name} "
                 f"--rows t2i,base_uncond --sweep cfg={a.cfg}",
    }  # fmt: skip
    _run(["bench", "components", "--model", str(tmp), "--n", str(a.components_n),
          "--json", str(reports / "components.json"), "--overwrite"])  # fmt: skip
    _run(["bench", "run", "--suite", "t2i", "--n", str(a.n), "--seed", str(a.seed), "--model", str(tmp),
          "--rows", "ground_truth,vae_ceiling,t2i", "--json", str(reports / "t2i.json"), "--quiet",
          "--overwrite"])  # fmt: skip
    sweep = None
    if a.cfg:
        _run(["bench", "run", "--suite", "t2i", "--n", str(a.sweep_n), "--seed", str(a.seed + 1),
              "--model", str(tmp), "--rows", "t2i,base_uncond", "--sweep", f"cfg={a.cfg}",
              "--json", str(reports / "cfg_sweep.json"), "--quiet", "--overwrite"])  # fmt: skip
        sweep = json.loads((reports / "cfg_sweep.json").read_text())
        shutil.copy(reports / "cfg_sweep_report" / "plots" / "t2i_overall_vs_cfg.png", tmp / "cfg_sweep.png")
    components = json.loads((reports / "components.json").read_text())
    t2i = json.loads((reports / "t2i.json").read_text())
    for f in ("components.json", "t2i.json", *(["cfg_sweep.json"] if sweep else [])):
        # the runs measured the temporary folder; the shipped copies name the folder they ship in
        text = (reports / f).read_text(encoding="utf-8").replace(json.dumps(str(tmp)), json.dumps(name))
        (tmp / f"metrics_{f}").write_text(text, encoding="utf-8")
    # only runs this runs/ folder holds (parts taken from --parts are quoted from their own card)
    records = [training_record(folder, r) for r, folder in run_folders(Path(a.runs), src).items()]
    for rec in records:  # read before --out is replaced: the base is often the bundle being reshipped
        if rec.get("base"):
            rec["earlier"] = earlier_training(base_card(rec), rec["recipe"])
    parts = parts_training_table(Path(a.parts)) if a.parts else None
    card = model_card(tmp, records, components, t2i, sweep, cmds, parts)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, out)
    print(f"shipped {out} ({sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 2**20:.1f} MiB of weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
