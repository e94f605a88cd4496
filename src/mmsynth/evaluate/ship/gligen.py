"""`mmsynth zoo ship gligen`: put the grounding layers of a `mmsynth train gligen` run into a bundle as its `gligen`
component, measured on the layout suite, with its own card.

The export (RUN/final/gligen, or RUN/exports/step_N/gligen) holds only what GLIGEN adds to the frozen UNet (the gated
self-attention layers and the box/phrase projection, float16) and the whole gated UNet's config; it is copied into a
temporary copy of the bundle, listed in mmsynth_components.json as layers over `unet` (models/components.py), loaded
back by name as a check, measured by `mmsynth bench run --suite layout` (ground truth, the prompt alone, GLIGEN: the
same layouts and seeds), carded, and renamed into place. An existing gligen/ is replaced only with --overwrite; a
refusal leaves the bundle as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.report import check_report_outputs
from mmsynth.evaluate.ship.common import (
    Bench,
    bench_overwrite,
    copy_into,
    metric_cell,
    named_as_shipped,
    require_bundle,
    run_bench,
    training_record,
    weight_bytes,
)
from mmsynth.evaluate.ship.control import update_bundle_card
from mmsynth.io import atomic_dir
from mmsynth.models.bundle import Bundle, list_components

COMPONENT = "gligen"
ROWS = ("ground_truth", "no_control", COMPONENT)
COLUMNS = ("ap50", "mean_iou", "phrase_acc", "layout_acc", "cost_ratio")
NOTES = {
    "ap50": "COCO AP at IoU 0.5 of the judge's detections (colour + shape = the class) against the layout boxes",
    "mean_iou": "per layout box, the IoU of the same-phrase detection assigned to it (0 without one)",
    "phrase_acc": "layout boxes holding a detection of the right colour and shape at IoU >= 0.5",
    "layout_acc": "layouts with every box right",
    "cost_ratio": "seconds per image over the prompt alone's, side by side",
}


def gligen_export(run: Path, step: int | None) -> Path:
    """RUN/final/gligen, or the snapshot RUN/exports/step_N/gligen; InputError when the run is not a GLIGEN run."""
    config = run / "config.yaml"
    if not config.is_file():
        raise InputError(f"--run '{run}' has no config.yaml: not a training run folder")
    recipe = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("recipe")
    if recipe != "gligen":
        raise InputError(f"--run '{run}' is a '{recipe}' run; `zoo ship gligen` takes a `mmsynth train gligen` run")
    folder = run / "final" / COMPONENT if step is None else run / "exports" / f"step_{step:07d}" / COMPONENT
    if not (folder / "config.json").is_file():
        raise InputError(f"--run '{run}': no export at {folder} (train to the end, or pick a snapshot with --step)")
    return folder


def card(record: dict[str, Any], report: dict[str, Any], command: str, out: Path, mib: float, export: Path) -> str:
    """gligen/README.md: what the layers are, how to use them, how they were trained, what they measure."""
    results = report["results"]["layout"]
    rows = [r for r in ROWS if r in results]
    table = ["| row | n | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        n = report["rows"]["layout"][r]["n_cases"]
        table.append(f"| {r} | {n} | " + " | ".join(metric_cell(report, "layout", r, c) for c in COLUMNS) + " |")
    notes = [n for n in report.get("notes", {}).get("layout", []) if "not measured" not in n]
    c = yaml.safe_load(record.get("config") or "{}") or {}
    o = c.get("options") or {}
    steps, batch = record.get("step", "?"), c.get("batch_size", "?")
    return "\n".join([
        f"# {out}/{COMPONENT}: the zoo's GLIGEN grounding layers",
        "",
        "GLIGEN (Li et al. 2023) for the zoo's frozen UNet: a gated self-attention layer in every transformer block "
        "reads one grounding token per box (the box's Fourier embedding with its phrase's pooled text embedding, "
        "through diffusers' `GLIGENTextBoundingboxProjection`); only those layers and the projection were trained, "
        f"the UNet, VAE and text encoder never. Stored: the layers alone, {mib:.1f} MiB of float16 safetensors "
        "(`layers.safetensors`) with the whole gated UNet's `config.json`; the bundle's manifest lists it as layers "
        "over `unet/`.",
        "",
        "Use: `mmsynth generate --layout layout.json --layout-method gligen` (or `--plan shapes` to plan the boxes "
        'from the prompt); in a request, `{"name": "gligen", "boxes": [[x0, y0, x1, y1]], "phrases": ["red circle"]}` '
        "(grounding on the first 30% of the steps, scheduled sampling: `schedule.end`). diffusers:",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel",
        "from safetensors.torch import load_file",
        f'unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config("{out}/{COMPONENT}"))',
        f'unet.load_state_dict(UNet2DConditionModel.from_pretrained("{out}", subfolder="unet").state_dict(), '
        "strict=False)",
        f'unet.load_state_dict(load_file("{out}/{COMPONENT}/layers.safetensors"), strict=False)',
        f'pipe = StableDiffusionGLIGENPipeline.from_pretrained("{out}", unet=unet, torch_dtype=torch.float32)',
        "```",
        "",
        "## Training",
        "",
        f"- `{export}`: {steps} steps of batch {batch}; lr {c.get('lr')} ({c.get('lr_schedule')}), the gates' "
        f"{o.get('gate_lr_scale', 1)}x; caption dropout {o.get('caption_dropout')}, grounding dropout "
        f"{o.get('grounding_dropout')} (whole images' boxes replaced by the learned null); no EMA",
        f"- logged wall time {record.get('logged_wall_h', 0):.2f} h (log.csv) on a 2-core x86 CPU, one thread; last "
        f"logged loss {float(record.get('last_log', {}).get('loss', 'nan')):.4g}",
        "- data: Shapes `train` scenes rendered on the fly; every object is one grounding token (its full box, "
        "its phrase 'colour shape')",
        "",
        "```yaml",
        (record.get("config") or "").strip(),
        "```",
        "",
        "## Layout following on the layout suite (test-split layouts with 1-4 boxes, seeds never trained on)",
        "",
        f"`{command}`",
        "",
        *table,
        "",
        *[f"- {k}: {v}" for k, v in NOTES.items()],
        "- ground_truth: the renders (the ceiling); no_control: the prompt alone with the same seeds.",
        "",
        *(["Bars (issue 52):", "", *[f"- {n}" for n in notes], ""] if notes else []),
    ])


def ship_gligen(run_dir: Path, out: Path, bench: Bench, *, step: int | None = None, n: int = 300, seed: int = 5,
                reports: Path = Path("runs/ship/gligen"), parts: Path | None = Path("docs/zoo_parts.md"),
                overwrite: bool = False) -> Path:  # fmt: skip
    """Ship the GLIGEN layers of training run `run_dir` into bundle `out`; returns the component's folder."""
    export = gligen_export(run_dir, step)
    require_bundle(out, "--out", "ship the text-to-image bundle first (`mmsynth zoo ship t2i`)")
    if (out / COMPONENT).exists() and not overwrite:
        raise InputError(f"--out '{out}' already has {COMPONENT}/ (pass --overwrite to replace it)")
    json_out = check_report_outputs(reports / f"{COMPONENT}.json", overwrite, "--reports")
    record = training_record(run_dir, "gligen")
    if step is not None:
        record["step"] = step

    def bench_args(model: Path) -> list[str]:
        return ["--suite", "layout", "--n", str(n), "--seed", str(seed), "--model", str(model), "--rows",
                ",".join(ROWS)]

    command = " ".join(["mmsynth bench run", *bench_args(out)])
    with atomic_dir(out, whole=True) as tmp:
        copy_into(out, tmp, skip=[COMPONENT])
        shutil.copytree(export, tmp / COMPONENT)
        list_components(tmp, {COMPONENT: {"library": "diffusers", "class": "UNet2DConditionModel", "base": "unet"}})
        Bundle.from_pretrained(tmp).extras[COMPONENT]  # loads by name over unet/, or refuses here
        run_bench(bench, ["bench", "run", *bench_args(tmp), "--json", str(json_out), "--quiet",
                          *bench_overwrite(overwrite)])  # fmt: skip
        report = json.loads(json_out.read_text(encoding="utf-8"))
        folder = tmp / COMPONENT
        (folder / "metrics_layout.json").write_text(named_as_shipped(json_out.read_text(encoding="utf-8"), tmp, out),
                                                    encoding="utf-8")  # fmt: skip
        (folder / "README.md").write_text(card(record, report, command, out, weight_bytes(folder) / 2**20, export),
                                          encoding="utf-8")  # fmt: skip
        update_bundle_card(tmp, parts)
    print(f"shipped {out / COMPONENT} ({weight_bytes(out) / 2**20:.1f} MiB of weights in {out})")
    return out / COMPONENT
