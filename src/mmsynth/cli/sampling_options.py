"""The sampling options of every command that samples (generate, edit, invert, demo, bench run), declared once.

Each option's flag and help are written here, its default and range (RANGES, which its argparse type checks) in
sample/request.py.
A command picks the options it takes with `add_sampling_arguments` (and may give another default or help where
the option means something else to it: edit and invert run 50 DDIM steps) and reads them back with
`sampling_kwargs`. Options are added with default None so that a command can tell given from not given
(generate's --replay refuses any of them); `sampling_kwargs` fills in the command's defaults.
Not a command: no `register`.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmsynth.cli.arguments import ranged
from mmsynth.sample.request import (
    DEFAULT_BEST_OF,
    DEFAULT_CFG,
    DEFAULT_ETA,
    DEFAULT_N,
    DEFAULT_SCHEDULER,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    RANGES,
)

_DEFAULTS = "sampling_defaults"  # the namespace attribute holding each declared option's default for this command


@dataclass(frozen=True)
class SamplingOption:
    """One option: `help` may name the command's default as {default}; `default` is the request's; `range` the key
    of its valid values in RANGES (None: a string)."""

    flags: tuple[str, ...]
    help: str
    default: Any
    range: str | None = None
    metavar: str | None = None


def _scheduler_help() -> str:
    from mmsynth.sample.schedulers import scheduler_names  # no diffusers import: names only

    return f"one of {', '.join(scheduler_names())} (default {{default}})"


def _options() -> dict[str, SamplingOption]:
    size = "a multiple of the model's VAE factor (default: the model's resolution)"
    return {
        "prompt": SamplingOption(("--prompt",), "text prompt (empty: unconditional generation)", ""),
        "negative_prompt": SamplingOption(("--negative-prompt",), "what to steer away from (default: empty)", ""),
        "n": SamplingOption(("-n", "--n"), "number of images (default {default})", DEFAULT_N, "n"),
        "seed": SamplingOption(("--seed",), "seed of image 0; image i uses seed + i (default {default})",
                               DEFAULT_SEED, "seed"),
        "steps": SamplingOption(("--steps",), "sampling steps (default {default})", DEFAULT_STEPS, "steps"),
        "cfg": SamplingOption(("--cfg",), "classifier-free guidance scale (default {default}; 1 = off)", DEFAULT_CFG,
                              "cfg"),
        "scheduler": SamplingOption(("--scheduler",), _scheduler_help(), DEFAULT_SCHEDULER),
        "height": SamplingOption(("--height",), f"image height, {size}", None, "side"),
        "width": SamplingOption(("--width",), f"image width, {size}", None, "side"),
        "eta": SamplingOption(("--eta",), "DDIM eta in [0, 1] (default {default}: deterministic)", DEFAULT_ETA, "eta"),
        "best_of": SamplingOption(("--best-of",), "draw K candidates per image and keep the one the bundle's CLIP "
                                  "finds closest to the prompt (candidate 0 is the plain image; K times the time; "
                                  "default {default})", DEFAULT_BEST_OF, "best_of", metavar="K"),
    }


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_sampling_arguments(p: argparse.ArgumentParser, which: Sequence[str], *,
                           defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None,
                           required: Collection[str] = ()) -> None:
    """Add the sampling options `which` (GenerationRequest field names) to `p`, in that order.

    defaults/helps: this command's own default or help (with {default}) where they differ from the request's;
    required: options the command cannot run without (edit's and invert's --prompt).
    """
    options = _options()
    unknown = [name for name in [*which, *(defaults or {}), *(helps or {}), *required] if name not in options]
    if unknown:
        raise ValueError(f"not sampling options: {unknown}; valid: {', '.join(options)}")
    chosen = {name: (defaults or {}).get(name, options[name].default) for name in which}
    for name, default in chosen.items():
        opt = options[name]
        text = (helps or {}).get(name, opt.help).replace("{default}", _shown(default))
        kind = None if opt.range is None else ranged(RANGES[opt.range])
        p.add_argument(*opt.flags, dest=name, type=kind, default=None, required=name in required,
                       metavar=opt.metavar, help=text)
    p.set_defaults(**{_DEFAULTS: chosen})


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options the command declared, each as given or the command's default (GenerationRequest's
    keyword arguments)."""
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in getattr(args, _DEFAULTS).items()}


def given_flags(args: argparse.Namespace) -> list[str]:
    """The flags of the sampling options given on the command line (generate's --replay refuses them)."""
    return [f"--{name.replace('_', '-')}" for name in getattr(args, _DEFAULTS) if getattr(args, name) is not None]


def add_run_arguments(p: argparse.ArgumentParser, writes: str, *, images: bool = True) -> None:
    """The options every sampling command shares besides the sampling ones: the model and how it runs, the size limits,
    --overwrite (`writes`: what it replaces) and --quiet; declared once for generate, edit and invert."""
    from mmsynth.cli import model_options
    from mmsynth.cli.arguments import add_limit_arguments

    model_options.add_arguments(p)  # --model, --config, --dtype, --device, --lora, memory options
    add_limit_arguments(p, images=images)
    p.add_argument("--overwrite", action="store_true", help=f"replace existing outputs ({writes})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
