"""`mmsynth bench`: cases -> images (reference rows and methods) -> scores against ground truth -> report.

cases.py (the case format), registry.py (suites and rows), generation.py (run context, standard rows,
capabilities), t2i.py / fidelity_suite.py / pending.py (the suites), distributed.py (split and merge across
processes), runner.py (plan and run), results.py (the JSON schema, Markdown), report.py (files, HTML, plots).
"""

from mmsynth.evaluate.bench.cases import CASE_FORMAT, Case, ControlSpec, read_cases, write_cases
from mmsynth.evaluate.bench.distributed import Distributed, merge_shards, shard
from mmsynth.evaluate.bench.generation import RunContext, SamplerSettings, register_capability
from mmsynth.evaluate.bench.registry import Row, RowScore, Suite, get_suite, register_row, register_suite, suite_names
from mmsynth.evaluate.bench.report import write_html, write_report
from mmsynth.evaluate.bench.results import RESULT_FORMAT, BenchResult, RowResult
from mmsynth.evaluate.bench.runner import RunOptions, generate_shard, parse_sweep, parse_variant, plan, run_bench


def make_cases(suite: str, n: int, seed: int = 0) -> list[Case]:
    """`n` cases (per category where the suite has categories) of a registered suite."""
    from mmsynth.errors import InputError

    s = get_suite(suite)
    if s.make_cases is None:
        raise InputError(f"suite '{suite}' has no case generator ({s.pending or 'no rows yet'})")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"--n must be an integer >= 1, got {n!r}")
    return s.make_cases(n, seed)


__all__ = [
    "CASE_FORMAT",
    "RESULT_FORMAT",
    "BenchResult",
    "Case",
    "ControlSpec",
    "Distributed",
    "Row",
    "RowResult",
    "RowScore",
    "RunContext",
    "RunOptions",
    "SamplerSettings",
    "Suite",
    "generate_shard",
    "get_suite",
    "make_cases",
    "merge_shards",
    "parse_sweep",
    "parse_variant",
    "plan",
    "read_cases",
    "register_capability",
    "register_row",
    "register_suite",
    "run_bench",
    "shard",
    "suite_names",
    "write_cases",
    "write_html",
    "write_report",
]
