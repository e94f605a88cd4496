"""`mmsynth zoo ship control`: put the network of a `mmsynth train controlnet|t2i-adapter` run into a bundle as the
control component the `control` bench suite measures (controlnet_canny, controlnet_segmentation, adapter_depth,
adapter_sketch, adapter_palette), measured, with its own card.

Steps: read the run (its config names the recipe and condition, hence the component: `curve.control_run`); take its
final export, or with --step the snapshot RUN/exports/step_N; measure its condition-following curve over the run's
snapshots when it has them (`mmsynth zoo curve`, cached in RUN/curve, so a second shipment of the same run costs
nothing there); copy --out's files into a temporary folder with the network beside them in float16 (diffusers'
format, listed in mmsynth_components.json, so `Bundle.from_pretrained` loads it by name and the sampler's
`controlnet` / `t2i-adapter` control can name it); run `mmsynth bench run --suite control` on its category there
(the component against the prompt alone, same seeds); write NAME/README.md (config, data, steps, wall time,
hardware, each figure under its command, the curve) and the bundle card's list of control components (and its quote
of the parts' record, as `zoo ship clip` refreshes it); rename the folder into place. A component already in --out is
replaced only with --overwrite; a refusal leaves --out as it was.
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

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.report import check_report_outputs
from mmsynth.evaluate.ship.common import (
    Bench,
    bench_overwrite,
    control_note,
    copy_into,
    metric_cell,
    named_as_shipped,
    parts_training_table,
    require_bundle,
    require_parts,
    run_bench,
    training_record,
    weight_bytes,
    weights_line,
)
from mmsynth.evaluate.ship.curve import (
    CURVE_FILE,
    CURVE_PLOT,
    DEFAULT_N,
    DEFAULT_SEED,
    ControlRun,
    condition_curve,
    control_run,
    curve_command,
    curve_lines,
    export_folder,
    last_logged,
    logged_wall_h,
    snapshots,
)
from mmsynth.io import atomic_dir
from mmsynth.models.bundle import list_components, load_component, save_components

CURVE_IMAGE = "condition_curve.png"
# what each figure of the card is (the control suite's docstring says how it is measured)
METRIC_NOTES: dict[str, str] = {
    "canny_f1": "F1 of the output's canny edges against the condition's (same thresholds, 100/200; exact pixels)",
    "canny_f1_low": "the same at the weaker-edge setting 50/100",
    "segmentation_miou": "mIoU of the judge's detections painted as a shape-class map against the exact map",
    "depth_order": "over object pairs whose outlines overlap, the fraction where the nearer object's colour owns the "
                   "overlap",
    "depth_order_contour": "the same pairs read from the output's edges: the nearer object's outline drawn across the "
                           "farther one, not the reverse (the depth map followed, whatever the colours)",
    "sketch_ssim": "SSIM of the output's XDoG against the condition",
    "palette_error": "mean CIELab deltaE of the 8x8 palettes of output and condition (lower is better)",
}
ROWS = ("ground_truth", "vae_ceiling", "no_control")  # beside the component: the ceiling and the reference


def bench_rows(component: str) -> str:
    return ",".join([*ROWS, component])


def columns(report: dict[str, Any], rows: list[str], first: str) -> list[str]:
    """The card's metric columns: the category's figure first, the others the rows have, attribute accuracy last."""
    names = {k for r in rows for k in report["results"]["control"].get(r, {}) if k != "cost_ratio"}
    rest = sorted(names - {first}, key=lambda k: (k.endswith("attribute_acc"), k))
    return [first, *rest] if first in names else rest


def training_lines(run: ControlRun, record: dict[str, Any], export: Path, step: int | None) -> list[str]:
    """What was trained, how long, on what, from which export (settings the config leaves out are left out)."""
    c = run.config
    o = c.get("options") or {}
    batch = c.get("batch_size", "?")
    steps = record.get("step", "?")
    seen = f" ({steps * batch} examples)" if isinstance(steps, int) and isinstance(batch, int) else ""
    settings = [f"{label} {v}" for label, v in (("lr", c.get("lr")), ("schedule", c.get("lr_schedule")),
                                                 ("precision", c.get("mixed_precision")),
                                                 ("caption dropout", o.get("caption_dropout")), ("EMA", c.get("ema")))
                if v is not None]  # fmt: skip
    last = record.get("last_log", {})
    shown = f"loss {float(last['loss']):.4g}" if last.get("loss") else "n/a"
    which = f"the snapshot `{export}` (--step {step})" if step is not None else f"the final export `{export}`"
    seed = f" (data_seed {c['data_seed']})" if "data_seed" in c else ""
    return [
        f"- {which}: {steps} steps of batch {batch}{seen}" + (f"; {', '.join(settings)}" if settings else ""),
        f"- logged wall time {record.get('logged_wall_h', 0):.2f} h (log.csv) on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads here), torch {torch.__version__}; last logged {shown}",
        f"- data: Shapes `{c.get('data_split', 'train')}` scenes rendered on the fly{seed}, each with its "
        f"`{run.condition}` map (train/conditions.py: exact from the scene spec where it knows the map, else the "
        "annotator on the render)",
        f"- run folder `{run.folder}`; weights shipped in float16",
    ]


def card(run: ControlRun, record: dict[str, Any], report: dict[str, Any], command: str, out: Path, mib: float,
         export: Path, step: int | None, curve: dict[str, Any] | None, curve_cmd: str | None) -> str:  # fmt: skip
    """NAME/README.md: what the component is, how to use it, how it was trained, what it measures."""
    name, kind = run.component, "ControlNet" if run.cls == "ControlNetModel" else "T2I-Adapter"
    control = "controlnet" if run.cls == "ControlNetModel" else "t2i-adapter"
    pipeline = "StableDiffusionControlNetPipeline" if control == "controlnet" else "StableDiffusionAdapterPipeline"
    keyword = "controlnet" if control == "controlnet" else "adapter"
    rows = [r for r in bench_rows(name).split(",") if r in report["results"]["control"]]
    cols = columns(report, rows, run.metric)
    table = ["| row | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        n = report["rows"]["control"][r]["n_cases"]
        table.append(f"| {r} | {n} | " + " | ".join(metric_cell(report, "control", r, c) for c in cols) + " |")
    notes = [n for n in report.get("notes", {}).get("control", []) if "not measured" not in n and "n/a" not in n]
    explained = [f"{c}: {METRIC_NOTES[c]}" for c in cols if c in METRIC_NOTES]
    explained += [f"{run.category}_attribute_acc: the judge's colour and shape accuracy against the prompt"]
    lines = [
        f"# {out}/{name}: the zoo's {run.category} {kind}",
        "",
        f"A diffusers `{run.cls}` trained with `mmsynth train {run.recipe}` for the frozen text-to-image model "
        f"`{run.base or out}` (its UNet, VAE and text encoder never trained) on `{run.condition}` condition maps; the "
        f"control suite measures it on its `{run.category}` cases. Weights: "
        f"{mib:.1f} MiB of float16 safetensors.",
        "",
        f"Use: the sampler's `{control}` control names it, e.g. "
        f'`{{"name": "{control}", "model": "{name}", "image": "condition.png"}}` in a request\'s `controls` '
        f"(`mmsynth generate --replay REQUEST.json`); diffusers: `{run.cls}.from_pretrained(DIR, "
        f'subfolder="{name}")` and `{pipeline}.from_pretrained(DIR, {keyword}=that)`.',
        "",
        "## Training",
        "",
        *training_lines(run, record, export, step),
        "",
        "```yaml",
        (record.get("config") or "").strip(),
        "```",
        "",
        f"## Condition following on the control suite's `{run.category}` cases (test split, seeds never trained on)",
        "",
        f"`{command}`",
        "",
        *table,
        "",
        *[f"- {e}" for e in explained],
        "- ground_truth: the renders (the ceiling); vae_ceiling: the renders through the VAE; no_control: the prompt "
        "alone with the same seeds (the reference every bar compares with).",
        "",
    ]
    if notes:
        lines += ["Bars (issue 51):", "", *[f"- {n}" for n in notes], ""]
    if curve is not None and curve_cmd is not None:
        s = curve["settings"]
        lines += [
            "## Condition-following curve",
            "",
            f"`{curve_cmd}`",
            "",
            f"![{s['metric']} against the training step]({CURVE_IMAGE})",
            "",
            *curve_lines(curve),
            "",
            f"Each point is one snapshot of the run (`RUN/exports/step_N`, and `RUN/final`) in `{out}` as `{name}`, "
            f"on the same {s['n']} `{run.category}` cases with the same seeds (seed {s['seed']}, sampler "
            f"{s['sampler']['steps']} steps, cfg {s['sampler']['cfg']:g}); no_control is the prompt alone on them."
            + (" The ControlNet paper's 'sudden convergence' shows as a jump between two snapshots."
               if kind == "ControlNet" else ""),
            "",
        ]
    return "\n".join(lines)


def update_bundle_card(bundle: Path, parts: Path | None) -> None:
    """The bundle card's weight total counts the new component, its list of control components names it (one line,
    replaced on every shipment), and its quote of the parts' record is the record's current table."""
    from mmsynth.evaluate.ship.clip import rewrite_parts_table

    path = bundle / "README.md"
    if not path.is_file():
        return
    text = re.sub(r"^Weights: .*$", weights_line(bundle), path.read_text(encoding="utf-8"), count=1,
                  flags=re.MULTILINE)  # fmt: skip
    note = control_note(bundle)
    if note is not None:
        text, found = re.subn(r"^Control components: .*$", lambda _: note, text, count=1, flags=re.MULTILINE)
        if not found:
            head, sep, rest = text.partition("\n\n## ")
            text = f"{head}\n\n{note}{sep}{rest}"
    quoted = parts_training_table(parts) if parts is not None else None
    path.write_text(rewrite_parts_table(text, quoted[1]) if quoted else text, encoding="utf-8")


def check_network_class(folder: Path, run: ControlRun) -> None:
    """Refuse an export whose network is not the class the run's recipe trains (a hand-copied folder)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") != run.cls:
        raise InputError(f"--run '{run.folder}': {folder} holds a {config.get('_class_name')}, not the {run.cls} a "
                         f"{run.recipe} run exports")  # fmt: skip


def ship_control(run_dir: Path, out: Path, bench: Bench, *, step: int | None = None, name: str | None = None,
                 n: int | None = None, seed: int = DEFAULT_SEED, steps: int | None = None, cfg: float | None = None,
                 reports: Path = Path("runs/ship/control"), curve: bool = True, curve_n: int = DEFAULT_N,
                 curve_every: int | None = None, curve_out: Path | None = None, device: str = "cpu",
                 parts: Path | None = Path("docs/zoo_parts.md"), overwrite: bool = False) -> Path:  # fmt: skip
    """Ship the control network of training run `run_dir` into bundle `out` as its control-suite component;
    returns the component's folder. Every refusal comes before any measurement and leaves `out` as it was."""
    from mmsynth.evaluate.bench import get_suite

    run = control_run(run_dir, name)
    export = export_folder(run, step)
    check_network_class(export / run.network, run)
    require_bundle(out, "--out", "ship the text-to-image bundle first (`mmsynth zoo ship t2i`)")
    if (out / run.component).exists() and not overwrite:
        raise InputError(f"--out '{out}' already has {run.component}/ (pass --overwrite to replace it)")
    require_parts(parts)
    json_out = check_report_outputs(reports / f"{run.component}.json", overwrite, "--reports")
    n = n or get_suite("control").default_n
    if run.base is not None and Path(run.base).resolve() != out.resolve():
        print(f"note: the run trained its {run.network} for '{run.base}' (options.base) and ships into '{out}'")
    record = training_record(run.folder, run.recipe)
    if step is not None or "step" not in record:  # a snapshot (or a run without summary.json): the log up to it
        record["step"] = step if step is not None else int(record.get("last_log", {}).get("step", 0))
        record["logged_wall_h"] = logged_wall_h(run.folder, record["step"])
        record["last_log"] = last_logged(run.folder, record["step"])
    measured, curve_cmd = None, None
    if curve and any(folder.parent.name == "exports" for _, folder in snapshots(run)):  # a curve of snapshots
        where = curve_out or run.folder / "curve"
        measured = condition_curve(run, where, model=out, n=curve_n, seed=seed, every=curve_every, steps=steps,
                                   cfg=cfg, device=device, overwrite=overwrite)  # fmt: skip
        curve_cmd = curve_command(run.folder, where, out, curve_n, seed, curve_every, steps, cfg)
    def bench_args(model: Path) -> list[str]:  # the card quotes what ran, with the bundle named as shipped
        return ["--suite", "control", "--categories", run.category, "--n", str(n), "--seed", str(seed), "--model",
                str(model), "--rows", bench_rows(run.component), *(["--steps", str(steps)] if steps else []),
                *(["--cfg", f"{cfg:g}"] if cfg is not None else [])]  # fmt: skip

    command = " ".join(["mmsynth bench run", *bench_args(out)])
    with atomic_dir(out, whole=True) as tmp:
        copy_into(out, tmp, skip=[run.component])
        with tempfile.TemporaryDirectory(prefix=".control-float16-", dir=tmp) as staged:
            fp16 = save_components(Path(staged) / "c", dtype=torch.float16,
                                   **{run.component: load_component(export, run.network)})  # fmt: skip
            shutil.move(fp16 / run.component, tmp / run.component)
        list_components(tmp, {run.component: {"library": "diffusers", "class": run.cls}})
        run_bench(bench, ["bench", "run", *bench_args(tmp), "--json", str(json_out), "--quiet",
                          *bench_overwrite(overwrite)])  # fmt: skip
        report = json.loads(json_out.read_text(encoding="utf-8"))
        folder = tmp / run.component
        (folder / "metrics_control.json").write_text(named_as_shipped(json_out.read_text(encoding="utf-8"), tmp, out),
                                                     encoding="utf-8")  # fmt: skip
        if measured is not None:
            where = curve_out or run.folder / "curve"
            shutil.copy(where / CURVE_PLOT, folder / CURVE_IMAGE)
            shutil.copy(where / CURVE_FILE, folder / "condition_curve.json")
        text = card(run, record, report, command, out, weight_bytes(folder) / 2**20, export, step, measured, curve_cmd)
        (folder / "README.md").write_text(text, encoding="utf-8")
        update_bundle_card(tmp, parts)
    print(f"shipped {out / run.component} ({weight_bytes(out) / 2**20:.1f} MiB of weights in {out})")
    return out / run.component
