"""Training configuration: plain dataclasses, filled from defaults < recipe defaults < YAML < CLI.

`TrainConfig` holds what every recipe shares (steps, batch, optimiser, logging, checkpoints); a
recipe adds its own `Options` dataclass under the `options:` key. Unknown keys and values of the
wrong type raise InputError naming the key and the valid ones, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mmsynth.errors import InputError
from mmsynth.sample.request import MAX_SEED

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
MAX_BATCH = 65536  # examples per micro-step, and micro-steps per step: far beyond any machine's memory at 64 px
MAX_WORKERS = 64  # DataLoader processes; more is a typo that forks until the machine gives out
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "warmup_stable_decay")


@dataclass
class TrainConfig:
    """What every training run needs; a recipe's own knobs live in its Options (key `options`)."""

    recipe: str = ""
    out: str = ""  # run folder; default runs/<recipe>
    max_steps: int = 1000
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    # warmup_stable_decay: constant, then a cosine decay to 0 over the last decay_steps. A constant run
    # extended with --max-steps can switch to it on --resume for a final cool-down.
    decay_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "auto"  # auto: bf16/fp16 on a GPU, none on a CPU
    ema: bool = True
    ema_decay: float = 0.999
    seed: int = 0
    data: str = "shapes"  # "shapes" (on-the-fly) or an imagefolder export directory
    data_split: str = "train"
    data_seed: int = 0
    num_workers: int = 1  # DataLoader processes rendering examples while the model trains
    log_every: int = 25
    sample_every: int = 500  # 0 disables sample grids
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # > 0: also write the recipe's export (EMA weights) every N steps to OUT/exports/step_N, kept all (a metric
    # against training steps, e.g. ControlNet's sudden convergence, without keeping every full checkpoint)
    export_every: int = 0

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"config key '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "decay_steps", "sample_every", "export_every", "num_workers", "weight_decay",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise InputError(f"config key '{name}' must be >= 0, got {getattr(self, name)}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) <= MAX_SEED:
                raise InputError(f"config key '{name}' must be an integer in [0, 2**63 - 1], got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum"):  # each micro-step's indices are materialised
            if getattr(self, name) > MAX_BATCH:
                raise InputError(f"config key '{name}' must be at most {MAX_BATCH}, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"config key '{name}' must be in [0, 1), got {getattr(self, name)}")
        if self.num_workers > MAX_WORKERS:
            raise InputError(f"config key 'num_workers' must be at most {MAX_WORKERS}, got {self.num_workers}")
        if self.lr <= 0:
            raise InputError(f"config key 'lr' must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"config key 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"config key 'mixed_precision' must be one of {', '.join(MIXED_PRECISION)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"config key 'lr_schedule' must be one of {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "warmup_stable_decay" and not 0 < self.decay_steps <= self.max_steps - self.warmup_steps:
            raise InputError(
                "lr_schedule 'warmup_stable_decay' needs 0 < decay_steps <= max_steps - warmup_steps, got "
                f"decay_steps={self.decay_steps}, max_steps={self.max_steps}, warmup_steps={self.warmup_steps}"
            )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a CLI string to the field type `tp`; InputError names `key` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, key)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(items, (list, tuple)):
            raise InputError(f"config key '{key}' expects a list, got {value!r}")
        item_type = args[0] if args else str
        return tuple(convert(v, item_type, key) for v in items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise InputError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}") from None
    return value


def apply_overrides(obj: Any, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Return a copy of dataclass `obj` with `values` applied (typed, validated names)."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise InputError(
                f"{where}: unknown config key '{prefix}{key}'; valid keys: {', '.join(prefix + n for n in names)}"
            )
        changes[key] = convert(value, hints[key], prefix + key)
    return dataclasses.replace(obj, **changes)


def parse_set(pairs: list[str]) -> dict[str, str]:
    """`["lr=1e-4", "options.snr_gamma=5"]` -> {"lr": "1e-4", "options.snr_gamma": "5"}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def load_config(
    recipe_cls: Any, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> tuple[TrainConfig, Any]:
    """Build (TrainConfig, recipe options) from the recipe's defaults, a YAML file and overrides.

    Override keys are TrainConfig fields or `options.<field>`; values may be strings (from the CLI).
    """
    config = apply_overrides(
        TrainConfig(recipe=recipe_cls.name), dict(recipe_cls.defaults), f"recipe {recipe_cls.name}"
    )
    options = recipe_cls.Options()
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise InputError(f"config file '{p}' is not UTF-8 text (YAML must be)") from None
        except RecursionError:
            raise InputError(f"config file '{p}' is nested too deeply to be a config") from None
        except yaml.YAMLError as exc:
            raise InputError(f"config file '{p}' is not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise InputError(f"config file '{p}' must be a mapping of keys to values")
        if data.get("recipe", recipe_cls.name) != recipe_cls.name:
            raise InputError(f"config file '{p}' is for recipe '{data['recipe']}', not '{recipe_cls.name}'")
        layers.append((f"config file '{p}'", data))
    if overrides:
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            if key.startswith("options."):
                nested.setdefault("options", {})[key[len("options.") :]] = value
            else:
                nested[key] = value
        layers.append(("command line", nested))
    for where, data in layers:
        data = dict(data)
        opts = data.pop("options", None) or {}
        if not isinstance(opts, dict):
            raise InputError(f"{where}: 'options' must be a mapping")
        config = apply_overrides(config, data, where)
        options = apply_overrides(options, opts, where, prefix="options.")
    if config.recipe != recipe_cls.name:
        raise InputError(f"config key 'recipe' is '{config.recipe}' but the recipe run is '{recipe_cls.name}'")
    if not config.out:
        config = dataclasses.replace(config, out=f"runs/{recipe_cls.name}")
    config.validate()
    if hasattr(options, "validate"):
        options.validate()
    return config, options


def to_dict(config: TrainConfig, options: Any) -> dict[str, Any]:
    """The YAML-ready form written next to checkpoints (tuples as lists)."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    d = {k: plain(v) for k, v in dataclasses.asdict(config).items()}
    d["options"] = {k: plain(v) for k, v in dataclasses.asdict(options).items()}
    return d
