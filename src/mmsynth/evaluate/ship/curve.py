"""A control training run (`mmsynth train controlnet|t2i-adapter`) as the zoo sees it, and its condition-following
curve (`mmsynth zoo curve`).

A run names its network by the recipe (RUN/final/controlnet, RUN/final/adapter, and every `export_every` steps
RUN/exports/step_NNNNNNN/...); in a bundle it is the component the `control` bench suite measures, named by the
recipe and `options.condition` (`control_run`).

The curve is the ControlNet paper's "sudden convergence" made measurable: each snapshot of the run is put into the
base bundle as that component and run through the control suite's own row on the same cases, with the same seeds
(`make_cases("control", n, seed)` kept to the component's category; the suite's score gives the figure: canny_f1,
segmentation_miou, depth_order, sketch_ssim or palette_error), beside the suite's no_control row as the
reference. Evaluation on a CPU is slow, so curve.json keeps every point with the sha256 of the snapshot's weights
and the settings it was measured under: a point already measured is reused, a run that goes on adds only its new
snapshots, and an interrupted curve resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmsynth.errors import InputError
from mmsynth.io import write_json

CURVE_FORMAT = 1
CURVE_FILE = "curve.json"
CURVE_PLOT = "curve.png"
DEFAULT_SEED = 4  # the case stream of `zoo ship control` and of its curve (any seed works; one keeps them alike)
DEFAULT_N = 16
# recipe -> (the network's folder in an export, its diffusers class)
NETWORKS: dict[str, tuple[str, str]] = {"controlnet": ("controlnet", "ControlNetModel"),
                                        "t2i-adapter": ("adapter", "T2IAdapter")}  # fmt: skip
# (recipe, options.condition) -> the bundle component the control suite measures
NAMES: dict[tuple[str, str], str] = {
    ("controlnet", "canny"): "controlnet_canny",
    ("controlnet", "segmentation"): "controlnet_segmentation",
    ("t2i-adapter", "depth"): "adapter_depth",
    ("t2i-adapter", "xdog"): "adapter_sketch",
    ("t2i-adapter", "lineart"): "adapter_sketch",
    ("t2i-adapter", "palette"): "adapter_palette",
}
# control-suite category -> its condition-following figure (the first metric its `condition_scores` gives)
METRICS: dict[str, str] = {"canny": "canny_f1", "segmentation": "segmentation_miou", "depth": "depth_order",
                           "sketch": "sketch_ssim", "palette": "palette_error"}  # fmt: skip
LOWER_IS_BETTER = ("palette_error",)
_STEP_FOLDER = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class ControlRun:
    """A control training run: where it is, what it trained and under which name the zoo ships it."""

    folder: Path
    recipe: str  # controlnet | t2i-adapter
    condition: str  # options.condition
    network: str  # the network's folder in an export: controlnet | adapter
    cls: str  # its diffusers class: ControlNetModel | T2IAdapter
    base: str | None  # options.base: the frozen bundle it was trained for
    component: str  # its name in a bundle (a control-suite component)
    category: str  # the control-suite category that measures it
    metric: str  # that category's condition-following figure
    config: dict[str, Any]


def category_of(component: str) -> str:
    """The control-suite category whose cases a component is measured on (its condition kind's category)."""
    from mmsynth.evaluate.bench.control_suite import COMPONENTS, CONDITIONS

    kind = next(k for k, c in COMPONENTS.items() if c == component)
    return next(cat for cat, (k, _) in CONDITIONS.items() if k == kind)


def control_run(run: Path, name: str | None = None) -> ControlRun:
    """Read RUN/config.yaml: the recipe, the condition and the component name (`name` overrides the inferred one;
    it must be a component the control suite measures, of the run's network class). InputError otherwise."""
    from mmsynth.evaluate.bench.control_suite import COMPONENTS

    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise InputError(f"--run '{run}' has no config.yaml; pass the folder of a `mmsynth train controlnet` or "
                         "`mmsynth train t2i-adapter` run")  # fmt: skip
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    recipe = config.get("recipe")
    if recipe not in NETWORKS:
        raise InputError(f"--run '{run}' is a '{recipe}' run; this takes a control run (recipe "
                         f"{' or '.join(NETWORKS)})")  # fmt: skip
    options = config.get("options") or {}
    condition = str(options.get("condition", "canny"))
    network, cls = NETWORKS[recipe]
    valid = [c for c in COMPONENTS.values() if c.startswith("controlnet_" if recipe == "controlnet" else "adapter_")]
    if name is None:
        name = NAMES.get((recipe, condition))
        if name is None:
            raise InputError(f"--run '{run}': the control suite has no component for a {recipe} on condition "
                             f"'{condition}'; name the one it stands in for with --name ({', '.join(valid)})")
    elif name not in valid:
        raise InputError(f"--name '{name}': a {recipe} run ships as one of {', '.join(valid)} (the components the "
                         "control bench suite measures)")  # fmt: skip
    category = category_of(name)
    base = options.get("base")
    return ControlRun(run, recipe, condition, network, cls, None if base is None else str(base), name, category,
                      METRICS[category], config)  # fmt: skip


def export_folder(run: ControlRun, step: int | None = None) -> Path:
    """RUN/final, or with `step` RUN/exports/step_NNNNNNN: the export holding the run's network (checked)."""
    from mmsynth.train.trainer import checkpoint_name

    folder = run.folder / "final" if step is None else run.folder / "exports" / checkpoint_name(step)
    if not (folder / run.network / "config.json").is_file():
        have = ", ".join(str(s) for s, _ in snapshots(run)) or "none"
        what = "final export" if step is None else f"export at step {step}"
        raise InputError(f"--run '{run.folder}' has no {what} ({folder / run.network} is missing; snapshots at "
                         f"steps: {have}); train on, or `mmsynth train ... --export-only` for the final one")
    return folder


def final_step(run: ControlRun) -> int | None:
    """The step of RUN/final: summary.json's, else None."""
    summary = run.folder / "summary.json"
    if summary.is_file():
        step = json.loads(summary.read_text(encoding="utf-8")).get("step")
        return int(step) if step is not None else None
    return None


def snapshots(run: ControlRun) -> list[tuple[int, Path]]:
    """(step, export folder) of every complete snapshot, by step: RUN/exports/step_N, and RUN/final at its step
    when no snapshot has that step already."""
    out: dict[int, Path] = {}
    exports = run.folder / "exports"
    for folder in sorted(exports.iterdir()) if exports.is_dir() else []:
        m = _STEP_FOLDER.fullmatch(folder.name)
        if m and (folder / run.network / "config.json").is_file():
            out[int(m.group(1))] = folder
    step = final_step(run)
    if step is not None and step not in out and (run.folder / "final" / run.network / "config.json").is_file():
        out[step] = run.folder / "final"
    return sorted(out.items())


def logged_wall_h(run: Path, until: int | None = None) -> float:
    """Hours of training the run's log.csv accounts for (each row: its steps since the previous row times its
    seconds per step), up to step `until`."""
    log = run / "log.csv"
    if not log.is_file():
        return 0.0
    prev, wall = 0, 0.0
    for row in csv.DictReader(log.open()):
        step = int(row["step"])
        if until is not None and step > until:
            break
        wall += (step - prev) * float(row["sec_per_step"])
        prev = step
    return wall / 3600


def last_logged(run: Path, until: int) -> dict[str, str]:
    """The last row of the run's log.csv at or before step `until` ({} when none)."""
    log = run / "log.csv"
    rows = [r for r in csv.DictReader(log.open()) if int(r["step"]) <= until] if log.is_file() else []
    return rows[-1] if rows else {}


def weights_sha256(*folders: Path) -> str:
    """One digest of the safetensors in these model folders (a re-exported snapshot of the same step is measured
    anew)."""
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            h.update(f"{folder.name}/{f.name}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def curve_command(run: Path, out: Path, model: Path, n: int, seed: int, every: int | None,
                  steps: int | None, cfg: float | None = None) -> str:  # fmt: skip
    """The `mmsynth zoo curve` command line that measures (or, cached, reads back) a curve."""
    parts = ["mmsynth zoo curve --run", str(run), "--model", str(model), "--n", str(n), "--seed", str(seed)]
    parts += ["--every", str(every)] if every else []
    parts += ["--steps", str(steps)] if steps else []
    parts += ["--cfg", f"{cfg:g}"] if cfg is not None else []
    return " ".join([*parts, "--out", str(out)])


BASE_PARTS = ("unet", "vae", "text_encoder")  # what a control's figure depends on in the bundle it is put into
UNKEYED = ("model",)  # recorded, not compared: the same weights elsewhere (model_sha256) keep their points


def _settings(run: ControlRun, model: Path, n: int, seed: int, sampler: Any) -> dict[str, Any]:
    """What a point depends on besides the snapshot's weights: a curve.json made under other settings (or in a
    bundle whose UNet, VAE or text encoder has been reshipped since) is not reused."""
    return {"component": run.component, "category": run.category, "metric": run.metric, "n": n, "seed": seed,
            "model": str(model.resolve()), "model_sha256": weights_sha256(*(model / p for p in BASE_PARTS)),
            "sampler": dataclasses.asdict(sampler)}  # fmt: skip


def condition_curve(run: ControlRun, out: Path, *, model: Path | None = None, n: int = DEFAULT_N,
                    seed: int = DEFAULT_SEED, every: int | None = None, steps: int | None = None,
                    cfg: float | None = None, device: str = "cpu", progress: bool = True,
                    overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Measure the run's snapshots (those whose step is a multiple of `every`; all without) into OUT/curve.json and
    plot OUT/curve.png; returns the curve. Points already in curve.json for the same weights and settings are kept.

    `model`: the bundle the network is put into (default: the run's options.base). `steps`, `cfg`: sampler steps and
    guidance scale (default: the bench's). A curve.json measured under other settings is refused unless `overwrite`
    (then it starts anew)."""
    from tqdm import tqdm

    from mmsynth.evaluate.bench import RunContext, RunOptions, SamplerSettings, make_cases, run_bench
    from mmsynth.evaluate.bench.cases import keep_categories
    from mmsynth.models import Bundle
    from mmsynth.models.bundle import load_component

    if model is None:
        if run.base is None:
            raise InputError(f"--run '{run.folder}' names no options.base; pass --model BUNDLE")
        model = Path(run.base)
    if not (model / "model_index.json").is_file():
        raise InputError(f"--model '{model}' is not a model bundle (no model_index.json); pass the bundle the run "
                         "trained its control for (its options.base) with --model")  # fmt: skip
    if every is not None and every < 1:
        raise InputError(f"--every must be a whole number of steps >= 1, got {every}")
    todo = [(s, f) for s, f in snapshots(run) if every is None or s % every == 0]
    if not todo:
        raise InputError(f"--run '{run.folder}' has no snapshots{f' at multiples of {every} steps' if every else ''} "
                         "(RUN/exports/step_N: set export_every in its config, or RUN/final)")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; expected a folder")
    sampler = SamplerSettings(**{k: v for k, v in (("steps", steps), ("cfg", cfg)) if v is not None})
    settings = _settings(run, model, n, seed, sampler)
    curve: dict[str, Any] = {"format": CURVE_FORMAT, "run": str(run.folder), "settings": settings,
                             "no_control": None, "points": {}}  # fmt: skip
    cached = out / CURVE_FILE
    if cached.is_file():
        old = json.loads(cached.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if k not in UNKEYED and (old.get("settings") or {}).get(k) != settings[k])
        changed = changed if old.get("format") == CURVE_FORMAT else ["format", *changed]
        if not changed:
            curve.update(no_control=old.get("no_control"), points=old.get("points", {}))
        elif not overwrite:
            raise InputError(f"the curve folder '{out}' holds a curve measured under other settings "
                             f"({', '.join(changed)}); pass --overwrite to measure it anew, or choose another folder "
                             "(zoo curve --out, zoo ship control --curve-out)")  # fmt: skip
    cases = keep_categories(make_cases("control", n, seed), run.category)
    bundle: Any = None
    ctx: Any = None

    def context() -> Any:
        nonlocal bundle, ctx
        if ctx is None:
            bundle = Bundle.from_pretrained(model).to(device)
            ctx = RunContext(bundle_obj=bundle, device=device, sampler=sampler, progress=progress)
        return ctx

    def measure(row: str) -> dict[str, Any]:
        t = time.perf_counter()
        result = run_bench(cases, context(), RunOptions(rows=[row], panels=0))
        assert result is not None
        metric = next(r for r in result.rows if r.row == row).metrics[run.metric]
        return {**metric.to_dict(), "wall_s": round(time.perf_counter() - t, 1)}

    with tqdm(total=len(todo) + 1, desc=f"curve {run.component}", disable=not progress) as bar:
        if curve["no_control"] is None:
            curve["no_control"] = measure("no_control")
            write_json(curve, cached)
        bar.update(1)
        for step, folder in todo:
            sha = weights_sha256(folder / run.network)
            point = curve["points"].get(str(step))
            if point is None or point.get("sha256") != sha:
                context()
                bundle.extras[run.component] = load_component(folder, run.network)
                point = {**measure(run.component), "sha256": sha, "export": str(folder)}
                curve["points"][str(step)] = point
                curve["points"] = dict(sorted(curve["points"].items(), key=lambda kv: int(kv[0])))
                write_json(curve, cached)  # after every point: an interrupted curve resumes here
            bar.set_postfix({run.metric: point["value"], "step": step})
            bar.update(1)
    write_json(curve, cached)
    plot_curve(curve, out / CURVE_PLOT)
    return curve


def curve_points(curve: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The measured points of a curve by step."""
    return sorted((int(s), p) for s, p in curve["points"].items())


def plot_curve(curve: dict[str, Any], path: Path) -> Path:
    """The metric against the training step (95% intervals), the no-control figure as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = curve["settings"]
    pts = [(x, p) for x, p in curve_points(curve) if p.get("value") is not None]  # NaN (no pairs) is not drawn
    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=100)
    xs, ys = [x for x, _ in pts], [p["value"] for _, p in pts]
    lows, highs = [p["ci95"][0] for _, p in pts], [p["ci95"][1] for _, p in pts]
    err = None
    if all(v is not None for v in (*lows, *highs, *ys)):
        err = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=s["component"])
    ref = curve.get("no_control") or {}
    if ref.get("value") is not None:
        ax.axhline(ref["value"], color="grey", linestyle="--", label="no_control")
        lo, hi = ref.get("ci95") or [None, None]
        if lo is not None and hi is not None:
            ax.axhspan(lo, hi, color="grey", alpha=0.15)
    better = "lower is better" if s["metric"] in LOWER_IS_BETTER else "higher is better"
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{s['metric']} ({better})")
    ax.set_title(f"{s['component']}: {s['metric']} vs step (n={s['n']}, seed {s['seed']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from mmsynth.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def curve_lines(curve: dict[str, Any]) -> list[str]:
    """The curve as a Markdown table: step, the figure [95% interval], cases; the no-control row first."""
    s = curve["settings"]

    def cell(p: dict[str, Any]) -> str:
        lo, hi = p.get("ci95") or [None, None]
        if p.get("value") is None:
            return "n/a"
        return f"{p['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")

    lines = [f"| step | {s['metric']} | n |", "|---:|---:|---:|"]
    if curve.get("no_control"):
        lines.append(f"| no_control | {cell(curve['no_control'])} | {curve['no_control']['n']} |")
    lines += [f"| {step} | {cell(p)} | {p['n']} |" for step, p in curve_points(curve)]
    return lines
