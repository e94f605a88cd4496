"""The suite and row registry: what the benchmark can run, so a new method adds a row without touching the runner.

A suite owns its cases (a generator), its scorer and its report panel; a row owns how an image is produced
for a case (a ground-truth render, the base model, a method) and what capabilities it needs. Registering a
row under an existing suite (`register_row("control", Row(...))`) is all a new control method has to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsynth.errors import InputError

if TYPE_CHECKING:
    from mmsynth.evaluate.bench.cases import Case
    from mmsynth.evaluate.bench.generation import RunContext
    from mmsynth.evaluate.bench.results import RowResult
    from mmsynth.evaluate.scoring import Metric

ROW_KINDS = ("reference", "method")
Panel = list[tuple[str, np.ndarray]]  # (title, image) tiles of one case, left to right


@dataclass
class RowScore:
    """A row's scores: metrics (with intervals where they are rates), metrics that could not be computed and why,
    and one verdict per scored case (whatever the suite's panel draws, e.g. the judge's ImageScore)."""

    metrics: dict[str, Metric]
    unavailable: dict[str, str] = field(default_factory=dict)
    verdicts: list[Any] = field(default_factory=list)
    case_ok: list[bool | None] = field(default_factory=list)  # per case, the verdict its category is scored by


@dataclass
class Row:
    """How one table row produces an image for a case.

    `needs(case)` lists the capabilities the row must have for that case (default: the case's own requirements,
    see Case.requirements); a case whose needs the model lacks is skipped with a reason (or fails with --strict).
    `generate_batch` (optional): images of several cases in one sampler call (ctx.batch_size at most), used
    instead of `generate` when given; batches are fixed blocks of the row's cases, so any split across
    processes gives the same images.
    `categories`: the case categories the row applies to (None: all); other cases are simply not its cases.
    `uses_model`: generation loads the model bundle. `params`: the row's own settings (sampler settings such as
    cfg and steps, or method settings such as a guidance strength `s0`), read by `generate` from `ctx.params`.
    `sweepable`: the settings `--sweep` may vary (it adds one variant row per value). `overrides`: the settings a
    sweep variant changes.
    """

    name: str
    kind: str
    description: str
    generate: Callable[[RunContext, Case], np.ndarray]
    generate_batch: Callable[[RunContext, list[Case]], list[np.ndarray]] | None = None  # several cases at once
    needs: Callable[[Case], list[str]] | None = None
    categories: tuple[str, ...] | None = None
    uses_model: bool = True
    params: dict[str, float] = field(default_factory=dict)
    sweepable: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    base: str | None = None  # for a sweep variant: the row it varies

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"row {self.name}: kind must be one of {ROW_KINDS}, got {self.kind!r}")

    def settings(self) -> dict[str, float]:
        """The row's settings with a sweep's overrides applied."""
        return {**self.params, **self.overrides}

    def applies_to(self, case: Case) -> bool:
        return self.categories is None or case.category in self.categories

    def requirements(self, case: Case) -> list[str]:
        return list(self.needs(case)) if self.needs is not None else case.requirements()


@dataclass
class Suite:
    """A benchmark suite. `pending` (a sentence) marks a suite that has no rows yet: it is listed, never faked."""

    name: str
    description: str
    make_cases: Callable[[int, int], list[Case]] | None = None  # (n, seed) -> cases
    score: Callable[[RunContext, list[Case], list[np.ndarray], list[Case]], RowScore] | None = None
    panel: Callable[[Case, np.ndarray, Any], Panel] | None = None
    check: Callable[[Case], None] | None = None  # validate a case before anything runs
    rows: dict[str, Row] = field(default_factory=dict)
    headline: str | None = None  # the metric plotted in sweeps
    sweep_metrics: tuple[str, ...] = ()  # more metrics plotted in sweeps (beside the headline)
    cost_baseline: str | None = None  # a row: every row also gets `cost_ratio`, its s/image over this row's
    higher_is_better: bool = True
    default_n: int = 500
    quick_n: int = 8
    needs_model_to_score: bool = False
    notes: Callable[[list[RowResult]], list[str]] | None = None  # report lines read across rows (e.g. bars)
    pending: str | None = None


SUITES: dict[str, Suite] = {}
_LOADED = False


def register_suite(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


def register_row(suite: str, row: Row) -> Row:
    """Add (or replace) a row of a registered suite; a suite with a row is no longer pending."""
    s = get_suite(suite)
    s.rows[row.name] = row
    return row


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    # importing a suite module registers it (import order = report order)
    # isort: off
    from mmsynth.evaluate.bench import t2i  # noqa: F401
    from mmsynth.evaluate.bench import control_suite  # noqa: F401
    from mmsynth.evaluate.bench import layout_suite  # noqa: F401
    from mmsynth.evaluate.bench import pending  # noqa: F401
    from mmsynth.evaluate.bench import edit_suite  # noqa: F401
    from mmsynth.evaluate.bench import guidance_suite  # noqa: F401
    from mmsynth.evaluate.bench import fidelity_suite  # noqa: F401
    # isort: on


def suite_names() -> list[str]:
    _load_builtin()
    return list(SUITES)


def get_suite(name: str) -> Suite:
    _load_builtin()
    if name not in SUITES:
        raise InputError(f"unknown suite '{name}'; valid: {', '.join(SUITES)}")
    return SUITES[name]
