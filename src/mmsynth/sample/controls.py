"""The control interface of the one sampler: what a plugin may contribute, and when.

The loop (sampler.py) owns the scheduler, the batch and the guidance sum; a control owns its own
condition and says, at each step and for each guidance branch, what it adds. The hooks cover every
method mmsynth must host (see DESIGN.md, "The one sampler and its controls"):

- `condition_sets` add or replace the guidance sum's condition sets (branches) and their weights.
- `inputs`   extra model inputs, merged BY KIND across controls (`ModelInputs`): ControlNet residuals,
             T2I-Adapter features, GLIGEN kwargs, extra input channels, timestep-embedding additions,
             extra context tokens or a context that replaces the text. Per branch, so a control says
             what it gives to the unconditional branch (nothing, a learned null, its own input);
             `branch_inputs` answers for all branches at once (one batched ControlNet call per step).
- `before`   work on the latent before the prediction, with a differentiable `predict` (guidance).
- `after`    work on the guided model output (eps terms, blending).
- `after_step` work on the latent the scheduler returned (blended-latent inpainting), on every pass.
- `repeats`  how many times to run this step (self-recurrence, RePaint resampling): the loop re-noises
             the latent `after_step` returned and rewinds the scheduler between passes.
- `jump`     after a step, go back several steps (RePaint's jumps): re-noised to that level, redone.
- `start`    the initial latents and timesteps (img2img / SDEdit, inversion from an image).
- `decoded`  work on the decoded images (pasting known pixels back); `close` always runs at the end.

Controls are plain dataclasses registered by name, so a request serialises to JSON and replays.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.errors import InputError
from mmsynth.models.denoiser import ModelInputs

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

BRANCHES = ("both", "cond", "uncond")
Predict = Callable[..., torch.Tensor]  # predict(latents, branch: str | None = None) -> model output


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool): what a numeric option of a control or a guide accepts."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# passes a control may ask for per step (self-recurrence, backward guidance, RePaint resampling): each is a model
# call, and the papers use at most tens; a larger count is a typo that would run for days
MAX_PASSES = 100


def is_integer(x: Any) -> bool:
    """An int (not a bool): what a count option of a control or a guide (passes, steps, cells) accepts."""
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------- schedule
@dataclass
class Schedule:
    """When and how strongly a control acts; shared by every control (ComfyUI-style conditioning options).

    scale: one float, or one per residual (ControlNet's 13, T2I-Adapter's 4); the loop applies it to
        the residual kinds of `ModelInputs`, other kinds read it themselves.
    start/end: fractions of the steps the loop runs, with diffusers' ControlNet rule (step i of n is
        active unless i/n < start or (i+1)/n > end).
    branch: "both", or only the "cond" (ControlNet guess mode, "control more important") or "uncond" branch.
    mask: an HxW region (array in [0, 1], image path or PNG data URI); the loop multiplies residuals by it.
    """

    scale: float | list[float] = 1.0
    start: float = 0.0
    end: float = 1.0
    branch: str = "both"
    mask: Any = None

    def __post_init__(self) -> None:
        scales = self.scale if isinstance(self.scale, list) else [self.scale]
        if not scales or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scales):
            raise InputError(f"schedule.scale must be a finite number or a non-empty list of them, got {self.scale!r}")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise InputError(
                f"schedule start/end must satisfy 0 <= start < end <= 1 (fractions of the steps), "
                f"got start={self.start}, end={self.end}"
            )
        if self.branch not in BRANCHES:
            raise InputError(f"schedule.branch must be one of {', '.join(BRANCHES)}, got {self.branch!r}")

    def active(self, step: Step) -> bool:
        i, n = step.index, step.count
        return not (i / n < self.start or (i + 1) / n > self.end)

    def applies_to(self, branch: str) -> bool:
        return self.branch == "both" or self.branch == branch

    def scale_at(self, i: int, count: int) -> float:
        """The scale of residual i of `count` (a list must have one entry per residual)."""
        if not isinstance(self.scale, list):
            return float(self.scale)
        if len(self.scale) != count:
            raise InputError(f"schedule.scale has {len(self.scale)} entries; this control gives {count} residuals")
        return float(self.scale[i])

    def mask_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """The region mask resized (area average) to x's spatial size, shaped 1x1xhxw; None without a mask."""
        if self.mask is None:
            return None
        m = torch.tensor(decode_array(self.mask, "schedule.mask"), dtype=torch.float32)  # copied: PNGs decode read-only
        if m.ndim == 3:
            m = m.mean(dim=-1)
        if m.max() > 1.0:
            m = m / 255.0
        m = F.interpolate(m[None, None], size=tuple(x.shape[-2:]), mode="area")
        return m.to(device=x.device, dtype=x.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": list(self.scale) if isinstance(self.scale, list) else self.scale,
            "start": self.start,
            "end": self.end,
            "branch": self.branch,
            "mask": encode_value(self.mask),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Schedule:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"schedule has unknown field(s) {sorted(unknown)}; valid: scale, start, end, branch, mask")
        if "mask" in d:
            d["mask"] = decode_value(d["mask"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------- step
@dataclass(frozen=True)
class Step:
    """One position in the loop, with the noise level a control needs for guidance formulas.

    `alpha_bar` is the cumulative signal level at t (for sigma-space schedulers such as Euler it is
    1 / (1 + sigma^2)); `input_scale` maps the scheduler's latent to the variance-preserving space the
    model sees (1 for DDIM / DPM-Solver / UniPC, 1/sqrt(1 + sigma^2) for Euler).
    """

    index: int
    count: int
    t: torch.Tensor
    alpha_bar: float
    alpha_bar_prev: float
    input_scale: float = 1.0

    @property
    def fraction(self) -> float:
        """Progress through the schedule: 0 at the first step, approaching 1 at the last."""
        return self.index / self.count

    @property
    def sigma(self) -> float:
        """sqrt((1 - abar) / abar): the noise-to-signal ratio (layout guidance's step size uses sigma^2)."""
        return math.sqrt((1.0 - self.alpha_bar) / self.alpha_bar)

    def to_eps(self, latents: torch.Tensor, output: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The noise prediction from a model output of any prediction type."""
        a, z = self.alpha_bar, latents * self.input_scale
        if prediction_type == "epsilon":
            return output
        if prediction_type == "v_prediction":
            return math.sqrt(a) * output + math.sqrt(1 - a) * z
        if prediction_type == "sample":
            return (z - math.sqrt(a) * output) / math.sqrt(1 - a)
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def to_x0(self, latents: torch.Tensor, output: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The one-step clean latent estimate x0_hat (what universal guidance decodes)."""
        a, z = self.alpha_bar, latents * self.input_scale
        if prediction_type == "v_prediction":  # directly: also defined at zero SNR (alpha_bar 0), unlike via eps
            return math.sqrt(a) * z - math.sqrt(1 - a) * output
        eps = self.to_eps(latents, output, prediction_type)
        return (z - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def from_eps(self, latents: torch.Tensor, eps: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Back from a noise prediction to the model's prediction type (after adding guidance to eps)."""
        if prediction_type == "epsilon":
            return eps
        a, z = self.alpha_bar, latents * self.input_scale
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if prediction_type == "v_prediction":
            return math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        if prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {prediction_type!r}")


@dataclass(frozen=True)
class Branch:
    """One condition set of the guidance sum: output = ref + sum_i weight_i * (out_i - ref).

    The first branch is the reference (its weight is unused). Classifier-free guidance is
    [uncond, cond(weight=cfg)]; Composer's w*eps(c2) + (1-w)*eps(c1) is [c1, c2(weight=w)].
    `context` is the encoded text of this branch (n x tokens x dim), what a control conditions on; None for a
    model without a text encoder (a control then gives the context, e.g. an exemplar's image embedding).
    Controls may add or replace branches (`Control.condition_sets`): multi-condition guidance is data.
    """

    name: str
    weight: float
    context: torch.Tensor | None
    # what else the network reads of this branch's text: SDXL's pooled embedding and time ids (added_cond_kwargs)
    added_cond: dict[str, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------- inputs
# ModelInputs (what a control adds to one model call, merged by kind) is defined beside the denoiser that reads it.


def _scaled(items: list[torch.Tensor], schedule: Schedule, offset: int, count: int) -> list[torch.Tensor]:
    out = []
    for i, x in enumerate(items):
        y = x * schedule.scale_at(offset + i, count) if schedule.scale != 1.0 else x
        m = schedule.mask_like(y)
        out.append(y if m is None else y * m)
    return out


def _sum(a: list[torch.Tensor] | None, b: list[torch.Tensor]) -> list[torch.Tensor]:
    if a is None:
        return b
    if len(a) != len(b):
        raise ValueError(f"controls give residual lists of different lengths ({len(a)} and {len(b)})")
    return [x + y for x, y in zip(a, b)]


def _merge_dict(a: dict | None, b: dict | None, kind: str) -> dict | None:
    if b is None:
        return a
    if a is None:
        return dict(b)
    clash = set(a) & set(b)
    if clash:
        raise InputError(f"two controls both set {kind} {sorted(clash)}; use one control of that kind")
    return {**a, **b}


def merge_inputs(items: list[tuple[ModelInputs, Schedule]]) -> ModelInputs:
    """Merge the inputs of several controls for one branch by kind (see ModelInputs)."""
    out = ModelInputs()
    for mi, sched in items:
        if mi.down_residuals is not None or mi.mid_residual is not None:
            down = list(mi.down_residuals or [])
            count = len(down) + (mi.mid_residual is not None)
            if down:
                out.down_residuals = _sum(out.down_residuals, _scaled(down, sched, 0, count))
            if mi.mid_residual is not None:
                (mid,) = _scaled([mi.mid_residual], sched, count - 1, count)
                out.mid_residual = mid if out.mid_residual is None else out.mid_residual + mid
        if mi.down_intrablock_residuals is not None:
            feats = list(mi.down_intrablock_residuals)
            out.down_intrablock_residuals = _sum(out.down_intrablock_residuals, _scaled(feats, sched, 0, len(feats)))
        out.cross_attention_kwargs = _merge_dict(out.cross_attention_kwargs, mi.cross_attention_kwargs,
                                                 "cross_attention_kwargs")
        out.added_cond_kwargs = _merge_dict(out.added_cond_kwargs, mi.added_cond_kwargs, "added_cond_kwargs")
        if mi.class_labels is not None:  # each control's labels go through the network's own embedding
            out.class_labels = [*(out.class_labels or []), mi.class_labels]
        if mi.timestep_cond is not None:
            out.timestep_cond = mi.timestep_cond if out.timestep_cond is None else out.timestep_cond + mi.timestep_cond
        for kind in ("extra_channels", "extra_context"):
            x = getattr(mi, kind)
            if x is not None:
                prev = getattr(out, kind)
                setattr(out, kind, x if prev is None else torch.cat([prev, x], dim=1))
        if mi.context is not None:
            if out.context is not None:
                raise InputError("two controls both replace the text context; at most one may")
            out.context = mi.context
    return out


# ---------------------------------------------------------------------------------------------- controls
@dataclass(kw_only=True)
class Control:
    """Base of every control: a plain dataclass with a schedule and no-op hooks to override.

    Subclasses set `name` (their registry key), declare their options as dataclass fields (numbers,
    strings, lists, arrays or image paths: what `to_dict` can serialise) and override only the hooks
    they need. Per-run state computed in `prepare` belongs in attributes set there (not fields).
    """

    name: ClassVar[str] = ""
    # options that may be a list with one value per image of the batch (request.for_image keeps image i's)
    per_image: ClassVar[tuple[str, ...]] = ()

    schedule: Schedule = field(default_factory=Schedule)

    def unet_name(self, bundle: Any) -> str | None:
        """Which of the bundle's UNets the run must call: None for its own, else a key of `bundle.extras` (an
        inpainting UNet). Asked before `prepare`, so controls that patch the UNet patch the one that runs."""
        return None

    def prepare(self, ctx: Context) -> None:
        """Once per run, before the loop: validate against the bundle, encode the condition, and register attention
        taps and hooks with `ctx.attention` (the loop applies them after every control has prepared)."""

    def start(self, ctx: Context) -> bool:
        """Set ctx.latents (and optionally ctx.timesteps) to start somewhere else than pure noise.

        Return True when it did; at most one control may.
        """
        return False

    def condition_sets(self, ctx: Context, branches: list[Branch]) -> list[Branch]:
        """The condition sets of the guidance sum, given those before this control: add or replace branches (a
        second negative, Composer's w * eps(c2) + (1 - w) * eps(c1)). Asked once, when the run is created."""
        return branches

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        """What this control adds to the model call of `branch` (latents: the scaled model input, n x C x h x w)."""
        return None

    def branch_inputs(self, ctx: Context, step: Step, branches: list[Branch],
                      latents: torch.Tensor) -> list[ModelInputs | None]:
        """What this control adds to each of `branches` in one model call. The default asks `inputs` per branch; a
        control with its own network (a ControlNet) overrides this to run it once, batched, for all of them."""
        return [self.inputs(ctx, step, b, latents) for b in branches]

    def before(self, ctx: Context, step: Step, latents: torch.Tensor, predict: Predict) -> torch.Tensor:
        """Move the latent before the prediction; `predict(latents, branch=None)` is differentiable."""
        return latents

    def after(self, ctx: Context, step: Step, latents: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Change the guided model output (in the scheduler's prediction type; see Step.to_eps/from_eps)."""
        return eps

    def after_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """Change the latent the scheduler returned (after every pass of a repeated step)."""
        return latents

    def repeats(self, ctx: Context, step: Step) -> int:
        """How many times to run this step (self-recurrence); the loop re-noises between passes."""
        return 1

    def recurrence(self) -> int:
        """The most passes `repeats` (or `jump`) may ask for in a run (> 1: it cannot run inside an inversion)."""
        return 1

    def jump(self, ctx: Context, step: Step) -> int:
        """After this step, go back this many steps (RePaint's jumps; 0 = go on): the loop re-noises the latent
        to the level of the step it returns to and restores the scheduler as it was there."""
        return 0

    def wants_gradient(self, ctx: Context, step: Step) -> bool:
        """True: the loop computes this step's guided prediction with gradients, from latents that require them,
        and `after` receives both (guidance then differentiates the prediction the loop uses, with no second
        UNet pass); the loop detaches the output before the scheduler step."""
        return False

    def decoded(self, ctx: Context, images: torch.Tensor) -> torch.Tensor:
        """Change the decoded images (n x 3 x H x W in [-1, 1])."""
        return images

    def close(self, ctx: Context) -> None:
        """Always called at the end (also on error) for a control whose `prepare` ran, last prepared first, after
        the attention service removed what was registered with it: release per-run state."""

    # ---- serialisation
    @classmethod
    def option_for_image(cls, key: str, value: Any, i: int) -> Any:
        """Image i's value of a `per_image` option as `to_dict` wrote it: a list holds one value per image."""
        return value[i] if isinstance(value, list) else value

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = value.to_dict() if isinstance(value, Schedule) else encode_value(value)
        return d


CONTROLS: dict[str, type[Control]] = {}


def register_control(cls: type[Control]) -> type[Control]:
    """Class decorator: make a control available by its `name` to requests and the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    CONTROLS[cls.name] = cls
    return cls


def _load_builtin_controls() -> None:
    # each module registers its controls on import
    import mmsynth.sample.attend_excite
    import mmsynth.sample.attention_replay
    import mmsynth.sample.composer
    import mmsynth.sample.controlnet
    import mmsynth.sample.gligen
    import mmsynth.sample.img2img
    import mmsynth.sample.inpaint
    import mmsynth.sample.inversion
    import mmsynth.sample.layout_attention
    import mmsynth.sample.layout_guidance
    import mmsynth.sample.null_text
    import mmsynth.sample.paint_by_example
    import mmsynth.sample.regional_prompts
    import mmsynth.sample.t2i_adapter
    import mmsynth.sample.universal  # noqa: F401


def control_names() -> list[str]:
    _load_builtin_controls()
    return sorted(CONTROLS)


def control_from_dict(d: dict[str, Any], where: str = "control") -> Control:
    """Build a control from its dict (as written by `Control.to_dict`), validating names and fields."""
    names = control_names()
    if not isinstance(d, dict) or "name" not in d:
        raise InputError(f"{where} must be an object with a 'name' (one of {', '.join(names)}), got {d!r:.80}")
    cls = CONTROLS.get(d["name"])
    if cls is None:
        raise InputError(f"{where}: unknown control {d['name']!r}; valid: {', '.join(names)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields - {"name"}
    if unknown:
        valid = ", ".join(sorted(fields))
        raise InputError(f"{where} ({cls.name}) has unknown field(s) {sorted(unknown)}; valid: {valid}")
    kwargs = {k: (Schedule.from_dict(v) if k == "schedule" else decode_value(v)) for k, v in d.items() if k != "name"}
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise InputError(f"{where} ({cls.name}): {exc}") from None
    except TypeError as exc:
        raise InputError(f"{where} ({cls.name}): {exc}") from None


def controls_from_dicts(items: list[dict[str, Any]]) -> list[Control]:
    return [control_from_dict(d, where=f"controls[{i}]") for i, d in enumerate(items)]


# ---------------------------------------------------------------------------------------------- values
_PNG_URI = "data:image/png;base64,"


def encode_value(value: Any) -> Any:
    """JSON form of a control option: uint8 images become PNG data URIs (exact, self-contained requests; a 4th
    channel is kept as it is, `decode_array` reads the PNG back in its own mode), other arrays and tensors nested
    lists with their dtype, dicts and lists element by element; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8 and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(value)).save(buf, format="PNG")
            return _PNG_URI + base64.b64encode(buf.getvalue()).decode("ascii")
        return {"array": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: encode_value(v) for k, v in value.items()}
    return value


def decode_value(value: Any) -> Any:
    """Inverse of encode_value for data URIs and array dicts; paths and numbers stay as they are."""
    if isinstance(value, str) and value.startswith(_PNG_URI):
        return decode_array(value, "image")
    if isinstance(value, dict) and set(value) == {"array", "dtype"}:
        return np.asarray(value["array"], dtype=value["dtype"])
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: decode_value(v) for k, v in value.items()}
    return value


def check_batch_length(value: Any, n: int, owner: str, noun: str) -> None:
    """An option given per image (a list) must have one entry per image of the batch."""
    if isinstance(value, list) and len(value) != n:
        raise InputError(f"{owner} has {len(value)} {noun} for a batch of {n}; give one per image")


def decode_array(value: Any, what: str) -> np.ndarray:
    """An image-like option as an array: arrays/tensors as given, PNG data URIs decoded, paths loaded."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str) and value.startswith(_PNG_URI):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(base64.b64decode(value[len(_PNG_URI):]))) as img:
                return np.asarray(img)
        except Exception:
            raise InputError(f"{what}: the embedded PNG data is corrupt") from None
    if isinstance(value, str):
        from mmsynth.io import load_image

        return load_image(value, what)
    raise InputError(f"{what} must be an image array, an image path or a PNG data URI, got {type(value).__name__}")
