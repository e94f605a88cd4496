"""Benchmark results and their stable JSON schema (docs/bench.md), plus the Markdown table.

    {"format": "mmsynth.bench/1",
     "results":     {suite: {row: {metric: value | null}}},      # the table
     "intervals":   {suite: {row: {metric: [low, high]}}},        # 95% Wilson intervals of rates
     "counts":      {suite: {row: {metric: n}}},                  # trials / images behind each value
     "rows":        {suite: {row: {kind, description, n_cases, n_skipped, wall_s, settings, sweep}}},
     "unavailable": {suite: {row: {metric: reason}}},
     "skipped":     {suite: {row: [{case, reason}]}},
     "pending":     {suite: note},                                # suites with no rows yet
     "notes":       {suite: [line]},                              # read across rows (the control suite's bars)
     "environment": {versions, python, platform, device, world_size, seeds, sample counts, cases},
     "wall_s": seconds}
Values are rounded to 4 decimals; NaN becomes null. Wall times are the only fields that differ between two
runs of the same cases and settings.
"""

from __future__ import annotations

import math
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmsynth.evaluate.scoring import Metric

RESULT_FORMAT = "mmsynth.bench/1"


def _r(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 4)


@dataclass
class Panel:
    """One case drawn for the report: its id, a caption, and (title, image) tiles."""

    case_id: str
    caption: str
    tiles: list[tuple[str, np.ndarray]]


@dataclass
class RowResult:
    suite: str
    row: str
    kind: str
    description: str
    metrics: dict[str, Metric]
    unavailable: dict[str, str] = field(default_factory=dict)
    n_cases: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    wall_s: float = 0.0
    gen_s: float = 0.0  # of wall_s, the seconds spent generating (on the main process)
    settings: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] | None = None  # {"row": base row, "param": name, "value": v}
    panels: list[Panel] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)  # one record per scored case (OUT.cases.jsonl)


@dataclass
class BenchResult:
    rows: list[RowResult]
    pending: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: dict[str, list[str]] = field(default_factory=dict)  # per suite, lines read across its rows (bars)

    def suites(self) -> list[str]:
        out: list[str] = []
        for r in self.rows:
            if r.suite not in out:
                out.append(r.suite)
        return out + [s for s in self.pending if s not in out]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": RESULT_FORMAT}
        for key in ("results", "intervals", "counts", "rows", "unavailable", "skipped"):
            d[key] = {s: {} for s in self.suites()}
        for r in self.rows:
            d["results"][r.suite][r.row] = {k: _r(m.value) for k, m in r.metrics.items()}
            d["intervals"][r.suite][r.row] = {k: [_r(m.low), _r(m.high)] for k, m in r.metrics.items()
                                              if not math.isnan(m.low)}  # fmt: skip
            d["counts"][r.suite][r.row] = {k: m.n for k, m in r.metrics.items()}
            d["rows"][r.suite][r.row] = {
                "kind": r.kind, "description": r.description, "n_cases": r.n_cases, "n_skipped": len(r.skipped),
                "wall_s": round(r.wall_s, 3), "settings": r.settings, "sweep": r.sweep,
            }  # fmt: skip
            if r.unavailable:
                d["unavailable"][r.suite][r.row] = dict(r.unavailable)
            if r.skipped:
                d["skipped"][r.suite][r.row] = list(r.skipped)
        d["pending"] = dict(self.pending)
        d["notes"] = {k: list(v) for k, v in self.notes.items()}
        d["environment"] = self.environment
        d["wall_s"] = round(self.wall_s, 3)
        return d

    def markdown(self) -> str:
        """One table per suite: rows x metrics, 'value [low, high]' where an interval exists."""
        lines: list[str] = []
        for suite in self.suites():
            lines.append(f"### {suite}")
            lines.append("")
            if suite in self.pending:
                lines += [f"_{self.pending[suite]}_", ""]
                continue
            rows = [r for r in self.rows if r.suite == suite]
            names: list[str] = []
            for r in rows:
                names += [k for k in r.metrics if k not in names]
            lines.append("| row | kind | n | " + " | ".join(names) + " | wall s |")
            lines.append("|---|---|---:|" + "---:|" * len(names) + "---:|")
            for r in rows:
                cells = [_cell(r.metrics.get(k)) for k in names]
                n = f"{r.n_cases}" + (f" ({len(r.skipped)} skipped)" if r.skipped else "")
                lines.append(f"| {r.row} | {r.kind} | {n} | " + " | ".join(cells) + f" | {r.wall_s:.1f} |")
            lines.append("")
            notes: dict[tuple[str, str], list[str]] = {}
            for r in rows:
                for k, v in r.unavailable.items():
                    notes.setdefault((k, v), []).append(r.row)
            for (k, v), where in notes.items():
                who = "all rows" if len(where) == len(rows) else ", ".join(where)
                lines.append(f"- `{k}` ({who}): unavailable, {v}")
            for r in rows:
                if r.skipped:
                    lines.append(f"- {r.row}: {len(r.skipped)} case(s) skipped, e.g. {r.skipped[0]['case']}: "
                                 f"{r.skipped[0]['reason']}")  # fmt: skip
            lines += [f"- {note}" for note in self.notes.get(suite, [])]
            if lines[-1]:
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"


def _cell(m: Metric | None) -> str:
    if m is None or math.isnan(m.value):
        return "n/a"
    if math.isnan(m.low):
        return f"{m.value:.4f}"
    return f"{m.value:.3f} [{m.low:.3f}, {m.high:.3f}]"


def environment(device: str, world_size: int) -> dict[str, Any]:
    """Versions and machine facts a reader needs to reproduce or compare a table."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("mmsynth", "torch", "diffusers", "transformers", "accelerate", "torchmetrics", "numpy", "scipy",
                "scikit-image", "opencv-python-headless", "pillow"):  # fmt: skip
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "world_size": world_size,
    }
