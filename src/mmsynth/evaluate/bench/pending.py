"""Suites whose methods are not built yet. They are listed in every report as "no rows yet" rather than
scored with made-up numbers; the issue that ships a method registers its rows (and the suite's case
generator and scorer) here, without touching the runner.
"""

from __future__ import annotations

from mmsynth.evaluate.bench.registry import Suite, register_suite

PENDING: dict[str, tuple[str, str]] = {}  # name -> (description, note); none today

for _name, (_description, _note) in PENDING.items():
    register_suite(Suite(name=_name, description=_description, pending=_note))
