"""Argument types and checks every command shares, so a bad number or device is refused where it is parsed.

argparse turns an `ArgumentTypeError` into one line naming the option, and exit 2. Not a command: no `register`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from mmsynth.errors import InputError
from mmsynth.sample.request import RANGES, Range


def _number(value: str, kind: type) -> float | int:
    try:
        x = kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if isinstance(x, float) and not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return x


def positive_int(value: str) -> int:
    """An integer >= 1 (a count of steps, images, scenes)."""
    x = _number(value, int)
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return int(x)


def non_negative_int(value: str) -> int:
    """An integer >= 0 (an index, a number of optional passes)."""
    x = _number(value, int)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return int(x)


def ranged(r: Range) -> Callable[[str], int | float]:
    """The argparse type of a request option whose valid values are `r` (sample/request.RANGES): the command line
    refuses what the request would, in the same words."""

    def parse(value: str) -> int | float:
        x = _number(value, int if r.integer else float)
        if not r.holds(x):
            raise argparse.ArgumentTypeError(f"must be {r.describe()}, got {value}")
        return x

    return parse


seed = ranged(RANGES["seed"])  # a generator seed: an integer in [0, 2**63 - 1]


def finite_float(value: str) -> float:
    """Any finite number (nan and inf refused)."""
    return float(_number(value, float))


def non_negative_float(value: str) -> float:
    """A finite number >= 0 (a guidance scale, a width in pixels)."""
    x = float(_number(value, float))
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return x


def positive_float(value: str) -> float:
    """A finite number > 0 (minutes, a step size)."""
    x = float(_number(value, float))
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return x


def fraction(value: str) -> float:
    """A finite number in [0, 1] (a fraction of the sampling schedule, a strength)."""
    x = float(_number(value, float))
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {value}")
    return x


def available_devices() -> list[str]:
    """The torch devices this machine can run on, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | None, what: str = "--device") -> str:
    """`name` checked against the devices that exist here (default: the first GPU, else the CPU)."""
    import torch

    devices = available_devices()
    if name is None:
        return "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{what} '{name}' is not a torch device; this machine has: {', '.join(devices)}") from None
    full = dev.type if dev.type in ("cpu", "mps") else f"{dev.type}:{0 if dev.index is None else dev.index}"
    if full not in devices:
        raise InputError(f"{what} '{name}' is not available on this machine; it has: {', '.join(devices)}")
    return name


def add_limit_arguments(p: argparse.ArgumentParser, images: bool = True) -> None:
    """--max-side (and, for commands that draw a batch, --max-images): the bounds a request must stay within."""
    from mmsynth.sample.request import DEFAULT_LIMITS

    p.add_argument("--max-side", type=positive_int, default=DEFAULT_LIMITS.max_side, metavar="PX",
                   help=f"refuse an image wider or taller than PX pixels (default {DEFAULT_LIMITS.max_side})")
    if images:
        p.add_argument("--max-images", type=positive_int, default=DEFAULT_LIMITS.max_images, metavar="N",
                       help=f"refuse more than N images in one call (default {DEFAULT_LIMITS.max_images})")


def limits_from_args(args: argparse.Namespace) -> Any:
    """The request Limits the --max-side / --max-images options give."""
    from mmsynth.sample.request import DEFAULT_LIMITS, Limits

    return Limits(max_side=args.max_side, max_images=getattr(args, "max_images", DEFAULT_LIMITS.max_images))
