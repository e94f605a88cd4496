"""`--control SPEC`: the spatial controls (ControlNet, T2I-Adapter) on the command line of `mmsynth generate` and
`mmsynth edit`.

SPEC is `NAME=IMAGE[,key=value...]`. NAME is a control component of the model (its class in the bundle's
mmsynth_components.json decides the control: ControlNetModel -> controlnet, T2IAdapter -> t2i-adapter), an alias of
a shipped component (`canny` -> controlnet_canny, ...), or `controlnet` / `t2i-adapter` with `model=DIR`.

Not a command: a command adds the option with `add_arguments` and builds the controls with `controls_from_args`
(images loaded here, so that the request embeds them and replays; built once, the sampler records them). Parsing
(`parse_spec`) is pure and imports neither torch nor the model, so that `--help` and bad syntax stay fast; the model's
components are read from its manifest without loading any weights.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsynth.errors import InputError

if TYPE_CHECKING:
    from mmsynth.sample.controls import Control

OPTION_NAMES = ("control",)  # the argparse destination (generate's --replay refuses it, like the other options)
# a component's class (manifest "class", or a directory's config.json "_class_name") -> the control that runs it
KINDS: dict[str, str] = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i-adapter"}
KIND_CLASSES = {kind: cls for cls, kind in KINDS.items()}
KIND_PREFIXES = {"controlnet": "controlnet_", "t2i-adapter": "adapter_"}  # how shipped components are named
# short names of the shipped components (the control bench's rows)
ALIASES: dict[str, str] = {"canny": "controlnet_canny", "segmentation": "controlnet_segmentation",
                           "seg": "controlnet_segmentation", "depth": "adapter_depth", "sketch": "adapter_sketch",
                           "palette": "adapter_palette"}
# sample.controlnet.MODES (checked equal in the tests), named here so that parsing does not import torch
MODES = ("balanced", "prompt", "control")
KEYS = ("weight", "start", "end", "mode", "guess", "mask", "annotate", "annotate.PARAM", "model")
CONTROLNET_ONLY = ("mode", "guess")
SYNTAX = "NAME=IMAGE[,key=value...]"
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class ControlSpec:
    """One --control as parsed (no file read yet): None = not given (the control's default)."""

    text: str
    name: str
    image: str
    weight: float | list[float] | None = None
    start: float | None = None
    end: float | None = None
    mode: str | None = None
    guess: bool | None = None
    mask: str | None = None
    annotate: str | None = None
    annotate_params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None

    @property
    def where(self) -> str:
        return f"--control '{self.text}'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", action="append", default=None, metavar="SPEC",
                   help=f"a spatial control (ControlNet or T2I-Adapter) as {SYNTAX}, e.g. canny=edges.png,weight=0.8;"
                   " repeatable (their residuals add up); the syntax and keys are listed below")


# ---------------------------------------------------------------------------------------------- parsing
def _number(value: str, key: str, where: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise InputError(f"{where}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InputError(f"{where}: {key} must be a finite number, got {value!r}")
    return x


def _fraction(value: str, key: str, where: str) -> float:
    x = _number(value, key, where)
    if not 0 <= x <= 1:
        raise InputError(f"{where}: {key} must be a fraction of the steps in [0, 1], got {value}")
    return x


def _weight(value: str, where: str) -> float | list[float]:
    parts = value.split("/")
    scales = [_number(v, "weight", where) for v in parts]
    bad = [v for v, x in zip(parts, scales) if x < 0]
    if bad:
        raise InputError(f"{where}: weight must be >= 0 (a number, or one per residual as a/b/c), got {bad[0]}")
    return scales if len(scales) > 1 else scales[0]


def parse_spec(text: str) -> ControlSpec:
    """One --control value as a ControlSpec; InputError naming the value and what is valid for bad syntax, an
    unknown or repeated key, a bad number, start >= end, a negative weight or an unknown mode or annotator."""
    where = f"--control '{text}'"
    name, sep, rest = text.partition("=")
    image, *items = rest.split(",")
    if not sep or not name.strip() or not image.strip():
        raise InputError(f"{where} must look like {SYNTAX} (e.g. canny=edges.png,weight=0.8)")
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise InputError(f"{where}: '{item}' must look like key=value (keys: {', '.join(KEYS)})")
        if key not in KEYS and not (key.startswith("annotate.") and len(key) > len("annotate.")):
            raise InputError(f"{where}: unknown key '{key}'; valid: {', '.join(KEYS)}")
        if key in values:
            raise InputError(f"{where}: {key} is given twice; give it once")
        values[key] = value
    kwargs: dict[str, Any] = {}
    if "weight" in values:
        kwargs["weight"] = _weight(values["weight"], where)
    for key in ("start", "end"):
        if key in values:
            kwargs[key] = _fraction(values[key], key, where)
    start, end = kwargs.get("start", 0.0), kwargs.get("end", 1.0)
    if start >= end:
        raise InputError(f"{where}: start must be below end (fractions of the steps, 0 <= start < end <= 1), got "
                         f"start={start:g}, end={end:g}")
    if "mode" in values:
        if values["mode"] not in MODES:
            raise InputError(f"{where}: unknown mode '{values['mode']}'; valid: {', '.join(MODES)} (balanced; "
                             "prompt = my prompt is more important; control = ControlNet is more important)")
        kwargs["mode"] = values["mode"]
    if "guess" in values:
        if values["guess"].lower() not in _BOOLS:
            raise InputError(f"{where}: guess must be true or false, got {values['guess']!r}")
        kwargs["guess"] = _BOOLS[values["guess"].lower()]
    params = {k[len("annotate."):]: v for k, v in values.items() if k.startswith("annotate.")}
    if params and "annotate" not in values:
        raise InputError(f"{where}: annotate.{next(iter(params))} needs annotate=NAME (the annotator it configures)")
    if "annotate" in values:
        from mmsynth.annotate import get_annotator  # (no torch)

        try:
            spec = get_annotator(values["annotate"])
            resolved = spec.resolve(params)  # typed and range-checked, as `mmsynth annotate -p` does
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        kwargs["annotate"] = values["annotate"]
        kwargs["annotate_params"] = {k: resolved[k] for k in params}
    for key in ("mask", "model"):
        if key in values:
            kwargs[key] = values[key]
    return ControlSpec(text=text, name=name.strip(), image=image.strip(), **kwargs)


# ---------------------------------------------------------------------------------------------- the model's controls
def control_components(model: str | Path) -> dict[str, str]:
    """The components of the bundle directory `model` that are spatial controls, name -> control name, read from
    its manifest alone (no torch, no weights; {} when it has none or it cannot be read: the bundle's loading says
    why). What --help shows."""
    try:
        data = json.loads((Path(model) / "mmsynth_components.json").read_text(encoding="utf-8"))
        entries = data["components"]
        return {name: KINDS[e["class"]] for name, e in entries.items() if e.get("class") in KINDS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _classes(model: str) -> dict[str, str]:
    """Every named component of the bundle `model` -> its class, from its manifest (checked: InputError on a bad
    manifest, as loading the bundle would say)."""
    from mmsynth.models.bundle import named_components

    return {name: e["class"] for name, e in named_components(model).items()}


def _valid_names(model: str, classes: dict[str, str]) -> str:
    """What a NAME may be on the bundle `model`, for an error message."""
    own = [n for n, c in classes.items() if c in KINDS]
    usable = [a for a, t in ALIASES.items() if t in own]
    mine = ", ".join(own) or (f"none: {model} carries no ControlNet or T2I-Adapter" if Path(model).is_dir() else
                              f"none: '{model}' is not a model directory here")
    return (f"valid: this model's control components ({mine}), the aliases of shipped components "
            f"{', '.join(ALIASES)} (this model has: {', '.join(usable) or 'none'}), or controlnet / t2i-adapter "
            "with model=DIR")


def _directory_kind(path: str, where: str) -> str | None:
    """The control a directory's config.json names (`_class_name`), None when it names none (the control's own
    loading then says what is wrong)."""
    try:
        cls = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(cls, str) and cls not in KINDS:
        raise InputError(f"{where}: model '{path}' is a {cls}, not a {' or a '.join(KINDS)}")
    return KINDS.get(cls) if isinstance(cls, str) else None


def resolve(spec: ControlSpec, model: str, classes: dict[str, str]) -> tuple[str, str]:
    """(control name, network) of `spec` on the bundle `model` whose components are `classes` (name -> class):
    the network is a component name or a directory. InputError for an unknown NAME (listing the valid ones), a kind
    that contradicts the network's class, or a ControlNet-only key on an adapter."""
    where, name = spec.where, spec.name
    kind: str
    if name in classes:
        if classes[name] not in KINDS:
            raise InputError(f"{where}: component '{name}' is a {classes[name]}, not a control; "
                             f"{_valid_names(model, classes)}")
        kind, network = KINDS[classes[name]], spec.model or name
    elif name in KIND_CLASSES:
        if spec.model is None:
            raise InputError(f"{where}: '{name}' needs model=DIR (a {KIND_CLASSES[name]} directory) or "
                             "model=COMPONENT; or name the component itself")
        kind, network = name, spec.model
    elif name in ALIASES:
        target = ALIASES[name]
        if spec.model is None and target not in classes:
            raise InputError(f"{where}: '{name}' is the shipped component {target}, which model '{model}' does not "
                             f"carry (or pass model=DIR); {_valid_names(model, classes)}")
        kind = "controlnet" if target.startswith(KIND_PREFIXES["controlnet"]) else "t2i-adapter"
        network = spec.model or target
    else:
        raise InputError(f"{where}: unknown control '{name}'; {_valid_names(model, classes)}")
    if network in classes:  # a model= override naming a component: its class must be the kind's
        if KINDS.get(classes[network]) != kind:
            raise InputError(f"{where}: model '{network}' is a {classes[network]}, not a {KIND_CLASSES[kind]}")
    elif spec.model is not None:
        if not Path(network).is_dir():
            raise InputError(f"{where}: model '{network}' is neither a component of model '{model}' nor a "
                             f"directory; {_valid_names(model, classes)}")
        found = _directory_kind(network, where)
        if found is not None and found != kind:
            raise InputError(f"{where}: model '{network}' is a {KIND_CLASSES[found]}, not a {KIND_CLASSES[kind]}")
    if kind != "controlnet":
        given = [k for k in CONTROLNET_ONLY if getattr(spec, k) is not None]
        if given:
            valid = ", ".join(k for k in KEYS if k not in CONTROLNET_ONLY)
            raise InputError(f"{where}: {given[0]} is a ControlNet option and '{name}' is a T2I-Adapter; its keys: "
                             f"{valid}")
    return kind, network


# ---------------------------------------------------------------------------------------------- building
def _mask(spec: ControlSpec, image_shape: tuple[int, ...]) -> Any:
    """The region mask: a binary PNG the size of the control's image (inpainting's rule), as HxW uint8 0/255."""
    import numpy as np

    from mmsynth.io import load_image
    from mmsynth.sample.inpaint import binary_mask

    what = f"{spec.where} mask"
    mask = binary_mask(load_image(spec.mask, what), what, white="where the control acts")
    if mask.shape != tuple(image_shape[:2]):
        raise InputError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image is {image_shape[1]}x"
                         f"{image_shape[0]}; they must have the same size (white = where the control acts)")
    if not mask.any():
        raise InputError(f"{what} is all black: the control would act nowhere (white = where it acts)")
    return mask.astype(np.uint8) * 255


def build(spec: ControlSpec, kind: str, network: str) -> Control:
    """The control of a resolved spec, its image (and mask) loaded, so that the request embeds them."""
    from mmsynth.io import load_image
    from mmsynth.sample.controlnet import ControlNet
    from mmsynth.sample.controls import Schedule
    from mmsynth.sample.t2i_adapter import T2IAdapterControl

    image = load_image(spec.image, f"{spec.where} image")
    sched: dict[str, Any] = {k: v for k, v in (("scale", spec.weight), ("start", spec.start), ("end", spec.end))
                             if v is not None}
    if spec.mask is not None:
        sched["mask"] = _mask(spec, image.shape)
    kwargs: dict[str, Any] = {"model": network, "image": image, "annotate": spec.annotate,
                              "annotate_params": dict(spec.annotate_params)}
    if kind == "controlnet":
        kwargs.update({k: v for k, v in (("mode", spec.mode), ("guess_mode", spec.guess)) if v is not None})
    try:
        return (ControlNet if kind == "controlnet" else T2IAdapterControl)(schedule=Schedule(**sched), **kwargs)
    except InputError as exc:
        raise InputError(f"{spec.where}: {exc}") from None


def controls_from_args(args: argparse.Namespace, model: str) -> list[Control]:
    """The controls of every --control (none without one), resolved against the bundle directory `model`: all are
    parsed and resolved before any image is read."""
    texts = getattr(args, "control", None) or []
    if not texts:
        return []
    specs = [parse_spec(t) for t in texts]
    classes = _classes(model)
    resolved = [resolve(s, model, classes) for s in specs]
    return [build(s, kind, network) for s, (kind, network) in zip(specs, resolved)]


# ---------------------------------------------------------------------------------------------- help
def help_text(default_model: str) -> str:
    """The --control syntax and keys, and the controls the default model carries (read from its manifest; no torch)."""
    from mmsynth.models.shipped import resolve_model

    try:
        carried = control_components(resolve_model(default_model))
    except InputError:
        carried = {}
    if carried:
        mine = ", ".join(f"{n} ({k})" for n, k in carried.items())
        aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items() if t in carried)
        default = f"the default model ({default_model}) carries: {mine}" + (f"; aliases: {aliases}" if aliases else "")
    else:
        default = (f"the default model ({default_model}) carries no ControlNet or T2I-Adapter yet: pass --model with "
                   "a bundle that lists some in its mmsynth_components.json, or use controlnet=IMAGE,model=DIR (e.g. "
                   "the export of `mmsynth train controlnet`)")
    import textwrap

    alias_text = textwrap.fill(", ".join(f"{a} ({t})" for a, t in ALIASES.items()) + ";", 110,
                               initial_indent=" " * 9, subsequent_indent=" " * 9)
    return "\n".join([
        f"spatial controls: --control {SYNTAX} (repeatable; composes with --init-image, --mask, --guide)",
        "  NAME   a control component of the model (its class decides: ControlNetModel -> controlnet, T2IAdapter ->",
        "         t2i-adapter); an alias of a shipped component:",
        alias_text,
        "         or controlnet / t2i-adapter with model=DIR",
        "  IMAGE  the condition image (resized to the output size with a warning; embedded in request.json)",
        "  keys:",
        "    weight=W        conditioning scale >= 0 (default 1), or one per residual as W1/W2/...",
        "    start=F, end=F  act from/until this fraction of the steps (default 0 and 1; start < end)",
        f"    mode=M          ControlNet only: {' | '.join(MODES)} (prompt = my prompt is more important, control =",
        "                    ControlNet is more important; default balanced)",
        "    guess=true      ControlNet only: guess mode (conditional branch only; residuals scaled 0.1 -> 1)",
        "    mask=PNG        binary region mask the size of IMAGE, white = where the control acts",
        "    annotate=A      extract the condition from IMAGE first with annotator A (canny, xdog, ...; see `mmsynth",
        "                    annotate --help`), its parameters as annotate.PARAM=V (e.g. annotate.low=50)",
        "    model=M         the network instead: a component of the model or a directory",
        "  e.g. --control canny=edges.png,weight=0.8,end=0.6 --control depth=depth.png,weight=0.5,mask=left.png",
        textwrap.fill(default, 110, initial_indent="  ", subsequent_indent="  "),
    ])
