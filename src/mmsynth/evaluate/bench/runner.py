"""The benchmark runner: cases in, a BenchResult out, for any suite and row in the registry.

Two phases, so that bad input fails before any work: planning (validate every case, pick rows and sweep
variants, decide which cases each row must skip, load the feature extractor) and execution (generate each
row's images, split across processes when launched with accelerate, merge in case order, score on the main
process). The runner never names a suite or a row: everything comes from the registry.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.cases import Case
from mmsynth.evaluate.bench.distributed import Distributed, merge_shards, shard
from mmsynth.evaluate.bench.generation import SAMPLER_SETTINGS, RunContext
from mmsynth.evaluate.bench.registry import Row, RowScore, Suite, get_suite, suite_names
from mmsynth.evaluate.bench.results import BenchResult, Panel, RowResult, environment
from mmsynth.evaluate.scoring import Metric
from mmsynth.sample.request import RANGES


def _request_range(name: str) -> tuple[Callable[[float], bool], str]:
    """A sampler setting's range as the request defines it (sample/request.RANGES), for values parsed as floats."""
    r = RANGES[name]

    def whole(v: float) -> bool:
        return math.isfinite(v) and v == int(v) and r.holds(int(v))

    return whole if r.integer else r.holds, f"{r.describe(plural=True)} ({r.hint})"


# setting -> (valid when, what is valid): every setting a row may declare sweepable must be listed here
SETTING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{name: _request_range(name) for name in SAMPLER_SETTINGS},  # cfg, steps, eta, best_of
    "s0": (lambda v: v >= 0, "a number >= 0 (forward guidance strength)"),
    "k": (lambda v: v >= 1 and v == int(v), "whole numbers >= 1 (self-recurrence passes)"),
    "m": (lambda v: v >= 0 and v == int(v), "whole numbers >= 0 (backward guidance steps)"),
    "step_size": (lambda v: v > 0, "a number > 0 (Attend-and-Excite's step scale)"),
    "strength": (lambda v: 0 < v <= 1, "in (0, 1] (image-to-image strength, or the fraction of steps inverted)"),
    "keep_attention": (lambda v: 0 <= v <= 1, "in [0, 1] (fraction of the steps replaying its self-attention)"),
    "cross_attention": (lambda v: 0 <= v <= 1, "in [0, 1] (fraction of the steps replaying its cross-attention)"),
    "resample": (lambda v: v >= 1 and v == int(v), "whole numbers >= 1 (inpainting passes per step)"),
    "resample_until": (lambda v: 0 <= v <= 1, "in [0, 1] (fraction of the steps resampled)"),
    "jump_length": (lambda v: v >= 1 and v == int(v), "whole numbers >= 1 (steps redone at once when resampling)"),
    "blend": (lambda v: v in (0, 1), "0 or 1 (inpainting: blend the known latents in after every step)"),
    "scale": (lambda v: v >= 0, "a number >= 0 (a control's conditioning scale)"),
    "beta": (lambda v: 0 < v <= 1, "in (0, 1] (GLIGEN's scheduled sampling: fraction of the steps grounded)"),
    "layout_eta": (lambda v: v >= 0, "a number >= 0 (backward layout guidance's step size)"),
    "base_ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (regional prompts: weight of the global prompt in a region)"),
    "layout_strength": (lambda v: 0 <= v <= 1, "in [0, 1] (forward layout guidance: share of attention moved)"),
    "start": (lambda v: 0 <= v < 1, "in [0, 1) (fraction of the steps before a control starts)"),
    "end": (lambda v: 0 < v <= 1, "in (0, 1] (fraction of the steps after which a control or guide stops)"),
    "mode": (lambda v: v in (0, 1, 2), "0, 1 or 2 (ControlNet mode: balanced, prompt more important, control "
             "more important)"),
}


def sweep_params() -> list[str]:
    """Settings `--sweep` accepts: the sampler's, and every setting a registered row declares sweepable."""
    names = list(SAMPLER_SETTINGS)
    for suite in suite_names():
        for row in get_suite(suite).rows.values():
            names += [p for p in row.sweepable if p not in names]
    return names


@dataclass
class RunOptions:
    """What to run beyond the cases: a row filter, sweeps of sampler settings, strictness, report panels."""

    rows: list[str] | None = None  # row names to run (every suite); None = all
    sweeps: dict[str, list[float]] = field(default_factory=dict)  # e.g. {"cfg": [1, 3, 7]}
    variants: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # e.g. [("swap", {"strength": 0.5})]
    strict: bool = False  # a case a row cannot honour is an error instead of a skip
    panels: int = 4  # cases drawn per row in the report
    include_pending: bool = False  # list every pending suite (the --quick overview), not only those with cases


@dataclass
class PlannedRow:
    suite: Suite
    row: Row
    todo: list[Case]
    skipped: list[dict[str, str]]
    references: list[Case]


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """'cfg=1,3,5' -> ('cfg', [1.0, 3.0, 5.0]), with errors naming what is valid."""
    name, sep, values = text.partition("=")
    return name, _setting_values(f"--sweep '{text}'", name if sep else "", values.split(","))


def _setting_values(where: str, name: str, values: list[str]) -> list[float]:
    """The numbers given for setting `name`, checked against its range; errors start with `where`."""
    valid = sweep_params()
    if name not in valid:
        raise InputError(f"{where}: expected PARAM=V with PARAM one of {', '.join(valid)}")
    try:
        vals = [float(v) for v in values if v.strip()]
    except ValueError:
        raise InputError(f"{where}: values must be numbers") from None
    if not vals:
        raise InputError(f"{where}: give a value for {name}")
    ok, what = SETTING_RANGES.get(name, (lambda v: True, ""))
    if not all(ok(v) for v in vals):
        raise InputError(f"{where}: {name} must be {what}")
    return vals


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    """'swap:strength=0.5,cfg=7.5' -> ('swap', {'strength': 0.5, 'cfg': 7.5}): settings changed together."""
    row, sep, rest = text.partition(":")
    if not sep or not row.strip() or not rest.strip():
        raise InputError(f"--variant '{text}': expected ROW:PARAM=V[,PARAM=V...], e.g. swap:strength=0.5,cfg=7.5")
    settings: dict[str, float] = {}
    for item in rest.split(","):
        name, sep, value = item.strip().partition("=")
        settings[name] = _setting_values(f"--variant '{text}'", name if sep else "", [value])[0]
    return row.strip(), settings


def variant_rows(rows: list[Row], variants: list[tuple[str, dict[str, float]]]) -> list[Row]:
    """One row per variant of a selected row, its settings changed together: 'row[p=v,q=w]' (not plotted)."""
    by_name = {r.name: r for r in rows}
    out = []
    for name, settings in variants:
        if name not in by_name:
            continue
        row = by_name[name]
        label = ",".join(f"{p}={v:g}" for p, v in settings.items())
        out.append(dataclasses.replace(row, name=f"{name}[{label}]", overrides=dict(settings)))
    return out


def sweep_rows(row: Row, sweeps: dict[str, list[float]]) -> list[Row]:
    """Variants of a row for the sweeps over settings it declares sweepable, one per value, 'row[param=value]'."""
    return [dataclasses.replace(row, name=f"{row.name}[{p}={v:g}]", overrides={p: v}, base=row.name)
            for p, vals in sweeps.items() if p in row.sweepable for v in vals]  # fmt: skip


def group_by_suite(cases: list[Case]) -> dict[str, list[Case]]:
    """Cases per suite, in registry order."""
    order = suite_names()
    out: dict[str, list[Case]] = {}
    for name in order:
        sel = [c for c in cases if c.suite == name]
        if sel:
            out[name] = sel
    return out


def plan(cases: list[Case], ctx: RunContext, options: RunOptions) -> tuple[list[PlannedRow], dict[str, str]]:
    """Validate and decide everything before any generation; returns the rows to run and the pending suites."""
    by_suite = group_by_suite(cases)
    pending: dict[str, str] = {}
    planned: list[PlannedRow] = []
    all_rows = sorted({r for s in suite_names() for r in get_suite(s).rows})
    for name in options.rows or []:
        if name not in all_rows:
            raise InputError(f"--rows: unknown row '{name}'; valid: {', '.join(all_rows)}")
    for name, settings in options.variants:
        if name not in all_rows:
            raise InputError(f"--variant: unknown row '{name}'; valid: {', '.join(all_rows)}")
        for row in (get_suite(s).rows[name] for s in suite_names() if name in get_suite(s).rows):
            bad = [p for p in settings if p not in row.sweepable]
            if bad:
                raise InputError(f"--variant: row '{name}' cannot vary {', '.join(bad)}; it varies "
                                 f"{', '.join(row.sweepable) or 'nothing'}")
    caps: set[str] | None = None
    for name in suite_names():
        suite = get_suite(name)
        if suite.score is None or not suite.rows:
            if name in by_suite or options.include_pending:
                pending[name] = suite.pending or "no rows yet"
            continue
        if name not in by_suite:
            continue
        sel = by_suite[name]
        if suite.check is not None:
            for c in sel:
                suite.check(c)
        references = [c for c in sel if c.reference]
        gen = [c for c in sel if not c.reference]
        rows = [r for r in suite.rows.values() if options.rows is None or r.name in options.rows]
        rows += [v for r in rows for v in sweep_rows(r, options.sweeps)]
        rows += variant_rows(list(suite.rows.values()), options.variants)  # a variant runs without its base row
        if rows and suite.needs_model_to_score:
            ctx.features()  # a missing extractor is an error now, not after an hour of generation
        for row in rows:
            todo, skipped = [], []
            mine = [c for c in gen if row.applies_to(c)]
            if not mine:
                continue  # none of this row's categories are in the case set
            for c in mine:
                needs = row.requirements(c)
                if needs and caps is None:
                    caps = ctx.capabilities()
                missing = [n for n in needs if n not in (caps or set())]
                if missing:
                    reason = f"the model lacks {', '.join(missing)}"
                    if options.strict:
                        raise InputError(f"--strict: case '{c.id}' ({name}/{row.name}): {reason}")
                    skipped.append({"case": c.id, "reason": reason})
                else:
                    todo.append(c)
            planned.append(PlannedRow(suite, row, todo, skipped, references))
    return planned, pending


def generate_shard(ctx: RunContext, row: Row, cases: list[Case], rank: int = 0, world: int = 1,
                   progress: bool = False) -> list[tuple[int, np.ndarray]]:  # fmt: skip
    """This process's share of a row's images, as (case position, image) pairs.

    A batching row's cases are cut into fixed blocks of ctx.batch_size and the blocks are shared out, so
    every image comes from the same batch whatever the number of processes."""
    saved, saved_params = ctx.sampler, ctx.params
    ctx.sampler = saved.with_overrides(row.settings())
    ctx.params = row.settings()
    try:
        if row.generate_batch is None or ctx.batch_size <= 1:
            mine = shard(cases, rank, world)
            return [(i, row.generate(ctx, c)) for i, c in tqdm(mine, desc=row.name, disable=not progress,
                                                               leave=False)]  # fmt: skip
        b = ctx.batch_size
        blocks = [list(range(k, min(k + b, len(cases)))) for k in range(0, len(cases), b)]
        blocks = [block for _, block in shard(blocks, rank, world)]
        out = []
        with tqdm(total=sum(map(len, blocks)), desc=row.name, disable=not progress, leave=False) as bar:
            for block in blocks:
                images = row.generate_batch(ctx, [cases[i] for i in block])
                out += list(zip(block, images))
                bar.update(len(block))
        return out
    finally:
        ctx.sampler, ctx.params = saved, saved_params


def run_bench(
    cases: list[Case],
    ctx: RunContext,
    options: RunOptions | None = None,
    dist: Distributed | None = None,
    on_row: Callable[[RowResult], None] | None = None,
) -> BenchResult | None:
    """Run every planned row; returns the result on the main process (None on the others)."""
    options = options or RunOptions()
    dist = dist or Distributed()
    t0 = time.perf_counter()
    planned, pending = plan(cases, ctx, options)
    results: list[RowResult] = []
    from mmsynth.sample.best_of import shared_candidates

    with shared_candidates() as shared:  # rows that differ only in best_of (a sweep) reuse each other's candidates
        for p in planned:
            t, reused = time.perf_counter(), shared.reused
            part = generate_shard(ctx, p.row, p.todo, dist.rank, dist.world, progress=ctx.progress and dist.is_main)
            gen_s = time.perf_counter() - t
            images = merge_shards(dist.gather(part), len(p.todo))
            if not dist.is_main:
                continue
            if p.todo:
                assert p.suite.score is not None
                scored = p.suite.score(ctx, p.todo, images, p.references)
            else:
                scored = RowScore({}, {"*": "every case was skipped"})
            settings = dataclasses.asdict(ctx.sampler.with_overrides(p.row.settings())) if p.row.uses_model else {}
            settings.update({k: v for k, v in p.row.settings().items() if k not in settings})
            rr = RowResult(
                suite=p.suite.name,
                row=p.row.name,
                kind=p.row.kind,
                description=p.row.description,
                metrics=scored.metrics,
                unavailable=scored.unavailable,
                n_cases=len(p.todo),
                skipped=p.skipped,
                wall_s=time.perf_counter() - t,
                gen_s=gen_s,
                settings=settings,
                sweep=_sweep_info(p.row),
                panels=_panels(p, images, scored, options.panels),
                cases=case_records(p.todo, scored),
            )
            if shared.reused > reused:  # its time is not what the row costs alone
                rr.unavailable["cost_ratio"] = (f"{shared.reused - reused} candidate batches were reused from an "
                                                "earlier row of this run; run the row alone for its cost")  # fmt: skip
            results.append(rr)
            if on_row is not None:
                on_row(rr)
    if not dist.is_main:
        return None
    add_cost_ratios(results)
    notes = {s: fn([r for r in results if r.suite == s]) for s in {r.suite for r in results}
             if (fn := get_suite(s).notes) is not None}  # fmt: skip
    env = environment(ctx.device, dist.world)
    env["sampler"] = dataclasses.asdict(ctx.sampler)
    env["extractor"] = ctx.extractor
    env["seeds"] = {
        "make_cases": sorted({c.extra["make_seed"] for c in cases if "make_seed" in c.extra}),
        "generation": "per case: field 'seed' (image i of a case is generated alone with that seed)",
    }
    env["sample_counts"] = {s: {"cases": len(cs), "reference": sum(c.reference for c in cs)}
                            for s, cs in group_by_suite(cases).items()}  # fmt: skip
    return BenchResult(results, pending, env, time.perf_counter() - t0, notes)


def add_cost_ratios(results: list[RowResult]) -> None:
    """`cost_ratio` of every model row of a suite with a cost baseline: its generation seconds per image over the
    baseline row's, both measured in this run (side by side, so machine speed cancels out)."""
    for suite in {r.suite for r in results}:
        base_name = get_suite(suite).cost_baseline
        base = next((r for r in results if r.suite == suite and r.row == base_name and r.n_cases), None)
        if base is None or base.gen_s <= 0:
            continue
        per_image = base.gen_s / base.n_cases
        for r in results:
            if r.suite == suite and r.n_cases and r.settings and "cost_ratio" not in r.unavailable:  # ran the model
                r.metrics["cost_ratio"] = Metric(r.gen_s / r.n_cases / per_image, r.n_cases)


def _sweep_info(row: Row) -> dict[str, Any] | None:
    if row.base is None:
        return None
    (param, value), = row.overrides.items()
    return {"row": row.base, "param": param, "value": value}


def case_records(cases: list[Case], scored: RowScore) -> list[dict[str, Any]]:
    """Per case: what was asked, the suite's verdict for its category (where the suite gives one) and the judge's
    full verdict (where it has one), so a failure can be looked up case by case."""
    out = []
    for i, case in enumerate(cases):
        record: dict[str, Any] = {"case": case.id, "category": case.category, "prompt": case.prompt, "seed": case.seed}
        if i < len(scored.case_ok):
            record["ok"] = scored.case_ok[i]
        verdict = scored.verdicts[i] if i < len(scored.verdicts) else None
        if hasattr(verdict, "to_dict"):
            record["verdict"] = verdict.to_dict()
        out.append(record)
    return out


def _panels(p: PlannedRow, images: list[np.ndarray], scored: RowScore, k: int) -> list[Panel]:
    """Up to k cases spread evenly over the row (so every category of a suite shows up)."""
    if p.suite.panel is None or k <= 0 or not p.todo:
        return []
    picks = sorted({int(round(x)) for x in np.linspace(0, len(p.todo) - 1, min(k, len(p.todo)))})
    out = []
    for i in picks:
        verdict: Any = scored.verdicts[i] if i < len(scored.verdicts) else None
        out.append(Panel(p.todo[i].id, p.todo[i].prompt, p.suite.panel(p.todo[i], images[i], verdict)))
    return out
