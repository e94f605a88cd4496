"""`mmsynth zoo ship t2i`: assemble the text-to-image bundle, measure it and write its model card.

The steps, all in a temporary folder beside --out that replaces it only at the end: copy the text-to-image bundle
(StableDiffusionPipeline layout, fp16 weights; a shipped unet_inpainting/ is kept) and, with a CLIP, replace its clip/
after checking that its text tower is the bundle's text encoder; `mmsynth bench components` (VAE PSNR, CLIP
retrieval); `mmsynth bench run --suite t2i` (the judge's bars) and a smaller CFG sweep; README.md, the model card:
configs, data, steps, hardware, wall time, every figure with its command, and the sweep's plot (cfg_sweep.png).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.report import check_report_outputs
from mmsynth.evaluate.ship.common import (
    INPAINTING_NOTE,
    Bench,
    architecture,
    base_card,
    bench_overwrite,
    check_reports,
    check_same_text_tower,
    components_lines,
    control_note,
    copy_into,
    earlier_training,
    metric_cell,
    named_as_shipped,
    parts_training_table,
    require_bundle,
    require_parts,
    run_bench,
    run_folders,
    tensor_summary,
    training_record,
    weight_bytes,
    weights_line,
)
from mmsynth.io import atomic_dir, check_output_dir
from mmsynth.models.bundle import CLIP_FOLDER, INPAINTING_UNET, list_components, named_components
from mmsynth.sample.request import MAX_SEED

T2I_COLUMNS = ("single_object", "binding", "count", "relation", "heldout", "heldout_binding", "overall")
SWEEP_PLOT = Path("cfg_sweep_report") / "plots" / "t2i_overall_vs_cfg.png"  # where the bench's HTML report puts it


def model_card(out: Path, records: list[dict[str, Any]], components: dict[str, Any], t2i: dict[str, Any],
               sweep: dict[str, Any] | None, cmds: dict[str, str], parts_card: tuple[str, list[str]] | None = None
               ) -> str:  # fmt: skip
    """The bundle's README.md: what it is, its weights, the judge's figures, the CFG sweep, the components and how
    every part was trained, each figure under the command that measured it."""
    _, counts = tensor_summary(out)
    lines = ["# shapes-v1: the mmsynth Shapes zoo", "",
             "A miniature Stable Diffusion stack trained from scratch on the procedural Shapes dataset: a word-level "
             "tokenizer, a CLIP (its text tower is the UNet's text encoder), an f=4 AutoencoderKL (64x64x3 <-> "
             "16x16x4) and a latent UNet2DConditionModel. diffusers' `StableDiffusionPipeline.from_pretrained` "
             "loads this folder.", "",
             weights_line(out), "",
             *([INPAINTING_NOTE, ""] if (out / INPAINTING_UNET).is_dir() else []),
             *([note, ""] if (note := control_note(out)) else []),
             *architecture(out, counts), "",
             "## Quality (the judge on test-split prompts; 95% Wilson intervals)", "",
             f"`{cmds['t2i']}`", "",
             "| row | single object | binding | count | relation | held-out object | held-out binding | overall |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d, row in ((t2i, "ground_truth"), (t2i, "vae_ceiling"), (sweep, "base_uncond"), (t2i, "t2i")):
        if d is not None and row in d["results"]["t2i"]:
            cells = [metric_cell(d, "t2i", row, c) for c in T2I_COLUMNS]
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
            lines.append(f"| {cfg:g} | " + " | ".join(metric_cell(sweep, "t2i", r, c) for c in
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
              f"`mmsynth zoo ship t2i --bundle {t2i_run}/final --out models/shapes-v1 --overwrite`.", ""]  # fmt: skip
    for rec in records:
        if rec.get("config"):
            lines += [f"### {rec['recipe']}: {rec['folder']}/config.yaml (the run as configured)", "", "```yaml",
                      rec["config"].rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def ship_t2i(bundle: Path, out: Path, bench: Bench, *, clip: Path | None = None, runs: Path = Path("runs"),
             parts: Path | None = Path("docs/zoo_parts.md"), reports: Path = Path("runs/ship/t2i"), n: int = 500,
             sweep_n: int = 100, cfg: Sequence[float] = (1.0, 3.0, 7.0), components_n: int = 1000, seed: int = 1,
             overwrite: bool = False) -> Path:  # fmt: skip
    """Ship text-to-image export `bundle` as `out`, measured and carded; `cfg` empty: no CFG sweep. Returns `out`.

    Everything is checked before any work (the inputs, then every file written), so a refusal costs nothing."""
    require_bundle(bundle, "--bundle", "train one with `mmsynth train t2i` (or --export-only)")
    if clip is not None and not (clip / CLIP_FOLDER / "config.json").is_file():
        raise InputError(f"--clip '{clip}' has no {CLIP_FOLDER}/; pass a `mmsynth train clip` export (RUN/final)")
    require_parts(parts)
    if cfg and seed >= MAX_SEED:
        raise InputError("--seed must be below 2**63 - 1: the CFG sweep runs on the next seed")
    check_output_dir(out, "--out", overwrite=overwrite)
    json_out = {name: check_report_outputs(reports / f"{name}.json", overwrite, "--reports")
                for name in ("t2i", *(["cfg_sweep"] if cfg else []))}  # fmt: skip
    json_out["components"] = check_reports(reports, ["components.json"], overwrite)[0]  # a JSON file alone
    if clip is not None or (bundle / CLIP_FOLDER).is_dir():  # a t2i run that trained its text encoder still
        check_same_text_tower(bundle, clip or bundle)  # carries the base's CLIP: refused before any bench
    # read before --out is replaced: the base of a fine-tuning run is often the bundle being reshipped
    records = [training_record(folder, r) for r, folder in run_folders(runs, bundle).items()]
    for rec in records:
        if rec.get("base"):
            rec["earlier"] = earlier_training(base_card(rec), rec["recipe"])
    quoted = parts_training_table(parts) if parts is not None else None
    cfgs = ",".join(f"{c:g}" for c in cfg)
    cmds = {
        "components": f"mmsynth bench components --model {out} --n {components_n}",
        "t2i": f"mmsynth bench run --suite t2i --n {n} --seed {seed} --model {out} --rows ground_truth,vae_ceiling,t2i",
        "sweep": f"mmsynth bench run --suite t2i --n {sweep_n} --seed {seed + 1} --model {out} "
                 f"--rows t2i,base_uncond --sweep cfg={cfgs}",
    }  # fmt: skip
    with atomic_dir(out, whole=True) as tmp:
        copy_into(bundle, tmp)
        # components shipped on their own (`zoo ship inpainting`, later methods' networks) stay, and stay listed
        kept = {name: entry for name, entry in named_components(out).items() if not (tmp / name).exists()}
        for name in kept:
            shutil.copytree(out / name, tmp / name)
        if kept:
            list_components(tmp, kept)
        if clip is not None:
            shutil.rmtree(tmp / CLIP_FOLDER, ignore_errors=True)
            shutil.copytree(clip / CLIP_FOLDER, tmp / CLIP_FOLDER)
        again = bench_overwrite(overwrite)
        run_bench(bench, ["bench", "components", "--model", str(tmp), "--n", str(components_n),
                          "--json", str(json_out["components"]), *again])  # fmt: skip
        run_bench(bench, ["bench", "run", "--suite", "t2i", "--n", str(n), "--seed", str(seed), "--model", str(tmp),
                          "--rows", "ground_truth,vae_ceiling,t2i", "--json", str(json_out["t2i"]), "--quiet",
                          *again])  # fmt: skip
        sweep = None
        if cfg:
            run_bench(bench, ["bench", "run", "--suite", "t2i", "--n", str(sweep_n), "--seed", str(seed + 1),
                              "--model", str(tmp), "--rows", "t2i,base_uncond", "--sweep", f"cfg={cfgs}",
                              "--json", str(json_out["cfg_sweep"]), "--quiet", *again])  # fmt: skip
            sweep = json.loads(json_out["cfg_sweep"].read_text())
            shutil.copy(reports / SWEEP_PLOT, tmp / "cfg_sweep.png")
        for name, path in json_out.items():  # the runs measured the staging folder; the copies name --out
            (tmp / f"metrics_{name}.json").write_text(named_as_shipped(path.read_text(encoding="utf-8"), tmp, out),
                                                     encoding="utf-8")  # fmt: skip
        card = model_card(tmp, records, json.loads(json_out["components"].read_text()),
                          json.loads(json_out["t2i"].read_text()), sweep, cmds, quoted)  # fmt: skip
        (tmp / "README.md").write_text(card, encoding="utf-8")
    print(f"shipped {out} ({weight_bytes(out) / 2**20:.1f} MiB of weights)")
    return out
