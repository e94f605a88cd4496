"""Ship the inpainting UNet of a `mmsynth train inpaint` run into a bundle as unet_inpainting/, with its card.

    python scripts/ship_inpainting.py [--run runs/inpaint] [--out models/shapes-v1] [--n 200] [--seed 3]

Steps: copy the run's exported UNet (RUN/final/unet, float16 safetensors) beside a copy of --out's other files in
a temporary folder, listed in its component manifest (mmsynth_components.json); benchmark inpainting there (the
edit suite's inpaint cases: blended latents with the text-to-image UNet, with resampling, and the inpainting UNet,
side by side in one run); write unet_inpainting/README.md (config, data, steps, hardware, wall time, the figures
and the command); rename the folder into place. scripts/ship_zoo.py keeps the bundle's components when it
reships the bundle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from mmsynth.cli.main import main as mmsynth
from mmsynth.io import replace_dir
from mmsynth.models.bundle import INPAINTING_UNET, list_components

ROWS = "inpaint,inpaint_resample,inpaint_unet"
COLUMNS = ("inpaint_inside_acc", "inpaint_outside_psnr", "cost_ratio")


def _ship_zoo():
    spec = importlib.util.spec_from_file_location("ship_zoo", Path(__file__).with_name("ship_zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(metric) -> str:
    if isinstance(metric, dict):
        lo, hi = metric.get("ci95") or (None, None)
        return f"{metric['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
    return "n/a" if metric is None else f"{metric:.3f}"


def card(record: dict, report: dict, command: str, out: str) -> str:
    """The unet_inpainting/ model card: what it is, how it was trained, what it measures."""
    rows = report["results"]["edit"]
    table = ["| row | n | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for name in ROWS.split(","):
        n = report["rows"]["edit"][name]["n_cases"]
        table.append(f"| {name} | {n} | " + " | ".join(_cell(rows[name].get(c)) for c in COLUMNS) + " |")
    last = record.get("last_log", {})
    import yaml

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


def _update_bundle_card(bundle: Path) -> None:
    """The bundle card's weight total counts the new UNet, and the card points at the UNet's own card."""
    import re

    card = bundle / "README.md"
    if not card.is_file():
        return
    ship = _ship_zoo()
    note = ship.INPAINTING_NOTE
    text = re.sub(r"^Weights: .*$", ship.weights_line(bundle), card.read_text(encoding="utf-8"), count=1,
                  flags=re.MULTILINE)  # fmt: skip
    if note not in text:
        head, sep, rest = text.partition("\n\n## ")
        text = f"{head}\n\n{note}{sep}{rest}"
    card.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/inpaint", help="the training run folder (its export: RUN/final)")
    p.add_argument("--out", default="models/shapes-v1", help="the bundle that gets unet_inpainting/ (replaced)")
    p.add_argument("--n", type=int, default=200, help="inpaint cases (default 200)")
    p.add_argument("--seed", type=int, default=3, help="case seed (default 3)")
    p.add_argument("--reports", default="runs/ship", help="where the bench report goes")
    a = p.parse_args(argv)

    run, out, reports = Path(a.run), Path(a.out), Path(a.reports)
    unet = run / "final" / "unet"
    if not (unet / "config.json").is_file():
        sys.exit(f"ship_inpainting: {unet} is missing; train with `mmsynth train inpaint` (or --export-only)")
    if json.loads((unet / "config.json").read_text())["in_channels"] != 9:
        sys.exit(f"ship_inpainting: {unet} is not an inpainting UNet (in_channels != 9)")
    reports.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.shipping")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp, ignore=shutil.ignore_patterns(INPAINTING_UNET))
    shutil.copytree(unet, tmp / INPAINTING_UNET)
    list_components(tmp, {INPAINTING_UNET: {"library": "diffusers", "class": "UNet2DConditionModel"}})
    command = (f"mmsynth bench run --suite edit --categories inpaint --n {a.n} --seed {a.seed} --model {out} "
               f"--rows {ROWS}")  # fmt: skip
    json_out = reports / "inpaint.json"
    args = ["bench", "run", "--suite", "edit", "--categories", "inpaint", "--n", str(a.n), "--seed", str(a.seed),
            "--model", str(tmp), "--rows", ROWS, "--json", str(json_out), "--quiet", "--overwrite"]  # fmt: skip
    print("$ mmsynth " + " ".join(args), flush=True)
    if mmsynth(args) != 0:
        sys.exit("ship_inpainting: the bench run failed")
    record = _ship_zoo().training_record(run, "inpaint")
    text = card(record, json.loads(json_out.read_text()), command, str(out))
    (tmp / INPAINTING_UNET / "README.md").write_text(text, encoding="utf-8")
    _update_bundle_card(tmp)
    replace_dir(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    print(f"shipped {out / INPAINTING_UNET} ({size:.1f} MiB of weights in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
