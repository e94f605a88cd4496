"""The annotator registry: one table of `image -> condition` functions with typed, range-checked parameters.

Why a table and not plain functions: the CLI's `--help`, the trainer's condition list and the benchmark all
need to enumerate annotators and their parameters, and bad user input must fail with the same clear
message everywhere (an InputError naming the parameter and its valid range).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.io import to_rgb_uint8

OUTPUT_KINDS: tuple[str, ...] = ("map", "vector", "mask")
PARAM_TYPES: tuple[str, ...] = ("int", "float", "str", "bool", "boxes", "phrases")
MIN_IMAGE_SIDE = 4


@dataclass(frozen=True)
class Param:
    """One annotator parameter. `low`/`high` bound numbers (inclusive); `choices` bound strings."""

    name: str
    type: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def range_text(self) -> str:
        """Human-readable valid range, used in errors and in `--help`."""
        if self.choices:
            return "one of " + "|".join(self.choices)
        if self.type == "int":
            return f"int in [{int(self.low)}, {int(self.high)}]"  # type: ignore[arg-type]
        if self.type == "float":
            return f"float in [{self.low:g}, {self.high:g}]"
        if self.type == "bool":
            return "true|false"
        if self.type == "boxes":
            return "JSON list of normalised [x0, y0, x1, y1] boxes, 0 <= x0 < x1 <= 1"
        if self.type == "phrases":
            return "JSON list of strings, one per box"
        return "any string"

    def validate(self, value: Any, where: str) -> Any:
        """Coerce `value` (possibly a CLI string) to this parameter's type and check its range."""
        bad = f"{where}: parameter '{self.name}' must be {self.range_text()}, got {value!r}"
        if self.type == "bool":
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool | np.bool_):
                return bool(value)
            raise InputError(bad)
        if self.type in ("int", "float"):
            if isinstance(value, bool):
                raise InputError(bad)
            try:
                num = float(value) if isinstance(value, str) else value
                num = float(num)
            except (TypeError, ValueError):
                raise InputError(bad) from None
            if not math.isfinite(num) or (self.type == "int" and num != int(num)):
                raise InputError(bad)
            assert self.low is not None and self.high is not None
            if not self.low <= num <= self.high:
                raise InputError(bad)
            return int(num) if self.type == "int" else num
        if self.type == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise InputError(bad)
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise InputError(bad) from None
        if self.type == "phrases":
            if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
                raise InputError(bad)
            return [str(p) for p in value]
        # boxes
        if not isinstance(value, list | tuple | np.ndarray):
            raise InputError(bad)
        boxes = []
        for b in value:
            try:
                x0, y0, x1, y1 = (float(v) for v in b)
            except (TypeError, ValueError):
                raise InputError(bad) from None
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise InputError(bad)
            boxes.append((x0, y0, x1, y1))
        return boxes


@dataclass(frozen=True)
class AnnotatorSpec:
    """A registered annotator: what it produces and which parameters it takes.

    `output` is "map" (HxW or HxWx3 uint8 at the input's size), "mask" (HxW uint8, 255 = region) or
    "vector" (a global float32 condition).
    """

    name: str
    help: str
    output: str
    fn: Callable[..., np.ndarray]
    params: tuple[Param, ...] = field(default_factory=tuple)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value validated; unknown names rejected with the valid ones listed."""
        known = {p.name for p in self.params}
        for name in params:
            if name not in known:
                valid = ", ".join(sorted(known)) or "none"
                raise InputError(f"annotator '{self.name}': unknown parameter '{name}' (valid: {valid})")
        where = f"annotator '{self.name}'"
        return {p.name: p.validate(params[p.name], where) if p.name in params else p.default for p in self.params}

    def __call__(self, image: np.ndarray, **params: Any) -> np.ndarray:
        return self.fn(as_rgb(image), **self.resolve(params))


_REGISTRY: dict[str, AnnotatorSpec] = {}


def register(name: str, help: str, output: str, params: tuple[Param, ...] = ()) -> Callable:
    """Decorator adding `fn(image, **params)` to the registry under `name`."""
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    for p in params:
        if p.type not in PARAM_TYPES:
            raise ValueError(f"parameter type must be one of {PARAM_TYPES}, got {p.type!r}")

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in _REGISTRY:
            raise ValueError(f"annotator '{name}' registered twice")
        _REGISTRY[name] = AnnotatorSpec(name=name, help=help, output=output, fn=fn, params=tuple(params))
        return fn

    return deco


def list_annotators() -> list[AnnotatorSpec]:
    """Every registered annotator, in registration order."""
    return list(_REGISTRY.values())


def get_annotator(kind: str) -> AnnotatorSpec:
    """The annotator called `kind`, or an InputError that lists the valid kinds."""
    if kind not in _REGISTRY:
        raise InputError(f"unknown annotator kind '{kind}' (valid: {', '.join(_REGISTRY)})")
    return _REGISTRY[kind]


def as_rgb(image: Any) -> np.ndarray:
    """Accept HxWx3 uint8 (and, leniently, HxW or HxWx4 uint8); anything else is an InputError."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (HxWx3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(
            f"image must be uint8 RGB, got dtype {image.dtype}; load files with mmsynth.io.load_image to convert"
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 4):
        image = to_rgb_uint8(Image.fromarray(np.ascontiguousarray(image)))
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must have shape HxWx3 (RGB), got {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        h, w = image.shape[:2]
        raise InputError(f"image must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, got {w}x{h}")
    return np.ascontiguousarray(image)
