"""`mmsynth zoo ship inpainting`: put the inpainting UNet of a `mmsynth train inpaint` run into a bundle as
unet_inpainting/, measured, with its own card.

Steps: copy the run's exported UNet (RUN/final/unet, float16 safetensors) beside a copy of --out's other files in a
temporary folder; benchmark inpainting there (the edit suite's inpaint cases: blended latents with the text-to-image
UNet, with resampling, and the inpainting UNet, side by side in one run); write unet_inpainting/README.md (config,
data, steps, hardware, wall time, the figures and the command) and point the bundle's card at it; rename the folder
into place. `mmsynth zoo ship t2i` keeps unet_inpainting/ when it reships the bundle.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.report import check_report_outputs
from mmsynth.evaluate.ship.common import (
    INPAINTING_NOTE,
    Bench,
    bench_overwrite,
    copy_into,
    metric_cell,
    require_bundle,
    run_bench,
    training_record,
    weight_bytes,
    weights_line,
)
from mmsynth.io import atomic_dir
from mmsynth.models.bundle import INPAINTING_UNET, list_components

ROWS = "inpaint,inpaint_resample,inpaint_unet"
COLUMNS = ("inpaint_inside_acc", "inpaint_outside_psnr", "cost_ratio")


def card(record: dict[str, Any], report: dict[str, Any], command: str, out: str) -> str:
    """The unet_inpainting/ model card: what it is, how it was trained, what it measures."""
    table = ["| row | n | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for name in ROWS.split(","):
        n = report["rows"]["edit"][name]["n_cases"]
        table.append(f"| {name} | {n} | " + " | ".join(metric_cell(report, "edit", name, c) for c in COLUMNS) + " |")
    last = record.get("last_log", {})
    batch = (yaml.safe_load(record.get("config") or "{}") or {}).get("batch_size", "?")
    return "\n".join([
        f"# {out}/{INPAINTING_UNET}: the zoo's inpainting UNet",
        "",
        "A diffusers `UNet2DConditionModel` with Stable Diffusion inpainting's input: the noisy latents, the mask "
        "(resized to the latents) and the latents of the image with the mask blanked (9 channels). It was grown from "
        f"the bundle's text-to-image UNet (`{out}/unet`: the new input channels start at zero) and fine-tuned with "
        "`mmsynth train inpaint` (src/mmsynth/train/recipes/inpaint.py) on Shapes `train` scenes rendered on the "
        "fly, masks over an object's box joined with a nearby box, random rectangles or the whole image.",
        "",
        "`mmsynth generate --init-image SRC --mask MASK --prompt ...` uses it (`--unet auto`, the default); "
        "diffusers loads it as `UNet2DConditionModel.from_pretrained(DIR, subfolder=\"unet_inpainting\")` and "
        "`StableDiffusionInpaintPipeline.from_pretrained(DIR, unet=that)` runs it.",
        "",
        "## Training",
        "",
        f"- steps: {record.get('step', '?')}, batch {batch}; logged wall time "
        f"{record.get('logged_wall_h', 0):.2f} h on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; last logged loss {last.get('loss', '?')}",
        f"- run folder {record['folder']}; weights saved in float16",
        "",
        "```yaml",
        (record.get("config") or "").strip(),
        "```",
        "",
        "## Inpainting on the edit suite's inpaint cases (test split, seeds never trained on)",
        "",
        f"`{command}`",
        "",
        *table,
        "",
        "inpaint_inside_acc: the judge finds the asked object (colour and shape) inside the mask; "
        "inpaint_outside_psnr: pixels outside the mask against the source (100 = identical, capped); cost_ratio: "
        "seconds per image against plain text-to-image sampling in the same run.",
        "",
    ])


def update_bundle_card(bundle: Path) -> None:
    """The bundle card's weight total counts the new UNet, and the card points at the UNet's own card (once: a note
    an earlier shipment wrote is replaced)."""
    path = bundle / "README.md"
    if not path.is_file():
        return
    text = re.sub(r"^Weights: .*$", weights_line(bundle), path.read_text(encoding="utf-8"), count=1,
                  flags=re.MULTILINE)  # fmt: skip
    text, found = re.subn(rf"^`{INPAINTING_UNET}/` holds .*$", lambda _: INPAINTING_NOTE, text, count=1,
                          flags=re.MULTILINE)
    if not found:
        head, sep, rest = text.partition("\n\n## ")
        text = f"{head}\n\n{INPAINTING_NOTE}{sep}{rest}"
    path.write_text(text, encoding="utf-8")


def ship_inpainting(run: Path, out: Path, bench: Bench, *, n: int = 200, seed: int = 3,
                    reports: Path = Path("runs/ship/inpainting"), overwrite: bool = False) -> Path:
    """Ship the inpainting UNet of training run `run` (RUN/final/unet) into bundle `out`; returns its folder."""
    unet = run / "final" / "unet"
    if not (unet / "config.json").is_file():
        raise InputError(f"--run '{run}': {unet} is missing; train with `mmsynth train inpaint` (or --export-only)")
    if json.loads((unet / "config.json").read_text()).get("in_channels") != 9:
        raise InputError(f"--run '{run}': {unet} is not an inpainting UNet (in_channels != 9)")
    require_bundle(out, "--out", "ship the text-to-image bundle first (`mmsynth zoo ship t2i`)")
    if (out / INPAINTING_UNET).exists() and not overwrite:
        raise InputError(f"--out '{out}' already has {INPAINTING_UNET}/ (pass --overwrite to replace it)")
    json_out = check_report_outputs(reports / "inpaint.json", overwrite, "--reports")
    command = f"mmsynth bench run --suite edit --categories inpaint --n {n} --seed {seed} --model {out} --rows {ROWS}"
    with atomic_dir(out, whole=True) as tmp:
        copy_into(out, tmp, skip=[INPAINTING_UNET])
        shutil.copytree(unet, tmp / INPAINTING_UNET)
        list_components(tmp, {INPAINTING_UNET: {"library": "diffusers", "class": "UNet2DConditionModel"}})
        run_bench(bench, ["bench", "run", "--suite", "edit", "--categories", "inpaint", "--n", str(n), "--seed",
                          str(seed), "--model", str(tmp), "--rows", ROWS, "--json", str(json_out), "--quiet",
                          *bench_overwrite(overwrite)])  # fmt: skip
        text = card(training_record(run, "inpaint"), json.loads(json_out.read_text()), command, str(out))
        (tmp / INPAINTING_UNET / "README.md").write_text(text, encoding="utf-8")
        update_bundle_card(tmp)
    print(f"shipped {out / INPAINTING_UNET} ({weight_bytes(out) / 2**20:.1f} MiB of weights in {out})")
    return out / INPAINTING_UNET
