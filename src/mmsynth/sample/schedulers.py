"""Scheduler names -> diffusers schedulers built from the bundle's own scheduler config.

Building from the bundle's config keeps its noise schedule (betas, prediction type, timestep
spacing) and only swaps the solver, like `Scheduler.from_config(pipe.scheduler.config)` in diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmsynth.errors import InputError


@dataclass(frozen=True)
class SchedulerSpec:
    """How to build one solver, and whether a step can be repeated without restoring its state.

    stateless: `step` reads nothing from earlier steps (DDIM), so self-recurrence can simply call it
    again; multistep solvers keep a history and a step index, so the loop snapshots and restores them.
    """

    build: Callable[[dict[str, Any]], Any]
    stateless: bool
    description: str


def _diffusers(name: str) -> Any:
    import diffusers  # lazily: listing scheduler names (CLI help) must not load diffusers

    return getattr(diffusers, name)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec(
        lambda cfg: _diffusers("DDIMScheduler").from_config(cfg), True, "DDIM (eta from the request)"
    ),
    "dpmpp-2m": SchedulerSpec(
        lambda cfg: _diffusers("DPMSolverMultistepScheduler").from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=2
        ),
        False,
        "DPM-Solver++ 2M (multistep)",
    ),
    "unipc": SchedulerSpec(
        lambda cfg: _diffusers("UniPCMultistepScheduler").from_config(cfg), False, "UniPC (multistep)"
    ),
    "euler": SchedulerSpec(
        lambda cfg: _diffusers("EulerDiscreteScheduler").from_config(cfg), False, "Euler (sigma space)"
    ),
}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def check_scheduler_name(name: str, what: str = "scheduler") -> SchedulerSpec:
    spec = SCHEDULERS.get(name)
    if spec is None:
        raise InputError(f"{what}: unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return spec


def make_scheduler(name: str, base: Any) -> Any:
    """A fresh scheduler of kind `name` with the noise schedule of `base` (a scheduler or its config)."""
    spec = check_scheduler_name(name)
    config = getattr(base, "config", base)
    return spec.build(dict(config))


def is_stateless(name: str) -> bool:
    """Whether a step of this scheduler can be re-run as is (see SchedulerSpec.stateless)."""
    return check_scheduler_name(name).stateless
