"""A generation request: everything needed to reproduce an output exactly, as JSON.

Saved next to every output image (one request per image, seed = its own seed, n = 1), so any image
is replayed with `mmsynth generate --replay request.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmsynth.errors import InputError
from mmsynth.sample.schedulers import check_scheduler_name

if TYPE_CHECKING:
    from mmsynth.sample.controls import Control

FORMAT = "mmsynth.request/1"
MAX_SEED = 2**63 - 1
MAX_BEST_OF = 64  # candidates per image: each is a full sampling run
DTYPES = ("fp32", "fp16", "bf16")  # the precisions a request may record (--dtype)

# The default of each sampling option, written once: GenerationRequest's fields, the CLI's shared parser
# (cli/sampling_options.py), the bench's SamplerSettings and the library functions all point here.
DEFAULT_SCHEDULER = "ddim"
DEFAULT_STEPS = 25
DEFAULT_CFG = 5.0  # classifier-free guidance scale (1 = off)
DEFAULT_SEED = 0
DEFAULT_N = 1  # images per request (`mmsynth generate` draws 4 unless told)
DEFAULT_ETA = 0.0  # DDIM eta (0 = deterministic)
DEFAULT_BEST_OF = 1  # 1 = plain sampling
DEFAULT_STRENGTH = 0.8  # img2img (SDEdit) strength; here so that `--help` can show it without loading torch
# DDIM inversion and the edits built on it (`mmsynth invert|edit`, sample/inversion.py, the bench's edit suite):
# more steps than sampling, because the inversion's error shrinks with the step size
DEFAULT_INVERSION_STEPS = 50
DEFAULT_INVERSION_CFG = 1.0  # inversion and its reconstruction: plain DDIM (inversion drifts at high CFG)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric request option, written once for the request's validation, the CLI's argument
    types (cli/arguments.ranged) and the bench's sweeps: lo <= x (<= hi), whole numbers when `integer`."""

    lo: int
    hi: int | None = None
    integer: bool = False
    hint: str = ""  # what the option means, in the request's errors
    hi_text: str | None = None  # how hi is written in messages (2**63 - 1 reads better than its digits)

    def holds(self, x: Any) -> bool:
        """x is of the option's kind (an int, not a bool, for whole numbers; a finite number else) and in range."""
        if not (isinstance(x, int) and not isinstance(x, bool) if self.integer else _real(x)):
            return False
        return x >= self.lo and (self.hi is None or x <= self.hi)

    def describe(self, plural: bool = False) -> str:
        """'an integer >= 1', 'a number in [0, 1]' ('whole numbers >= 1' said of a list of values)."""
        kind = ("whole numbers" if plural else "an integer") if self.integer else "a number"
        bound = f">= {self.lo}" if self.hi is None else f"in [{self.lo}, {self.hi_text or self.hi}]"
        return f"{kind} {bound}"

    def check(self, x: Any, name: str) -> None:
        if not self.holds(x):
            raise InputError(f"{name} must be {self.describe()} ({self.hint}), got {x!r}")


# The range of each numeric option of a request (image sides: both height and width).
RANGES: dict[str, Range] = {
    "steps": Range(1, integer=True, hint="the number of sampling steps, e.g. 25"),
    "n": Range(1, integer=True, hint="the number of images (batch size)"),
    "best_of": Range(1, MAX_BEST_OF, integer=True, hint="candidates per image ranked by the bundle's CLIP; 1 = plain "
                     "sampling"),
    "seed": Range(0, MAX_SEED, integer=True, hint="a non-negative integer", hi_text="2**63 - 1"),
    "cfg": Range(0, hint="1 = no guidance, 5-8 typical"),
    "eta": Range(0, 1, hint="0 = deterministic DDIM"),
    "side": Range(1, integer=True, hint="image size in pixels, a multiple of the model's VAE factor"),
}


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one request may allocate, so that a typo (`--height 100000`) or a hostile request file
    is refused at once instead of allocating until the machine gives out. Each names the option that raises it."""

    max_side: int = 2048  # pixels per image side (--max-side)
    max_images: int = 64  # images sampled together in one call, n (--max-images)

    def check_size(self, height: int | None, width: int | None, what: str = "") -> None:
        for side, value in (("height", height), ("width", width)):
            if value is not None and value > self.max_side:
                raise InputError(f"{what}{side} {value} is above the limit of {self.max_side} pixels per side "
                                 "(--max-side raises it)")

    def check(self, request: GenerationRequest) -> None:
        self.check_size(request.height, request.width)
        if request.n > self.max_images:
            raise InputError(f"n {request.n} is above the limit of {self.max_images} images per call "
                             "(--max-images raises it; or run several calls with other seeds)")


DEFAULT_LIMITS = Limits()


@dataclass
class GenerationRequest:
    """What to generate. `controls` are dicts as written by `Control.to_dict` (name + options).

    `prompt` is one prompt for all n images, or a list of n prompts (image i gets prompt[i] and seed + i, so a
    batch of different prompts gives, image by image, what n separate requests give); `negative_prompt` likewise.
    height/width None means the model's native resolution; model None means the caller's bundle. best_of K > 1:
    each image is the bundle CLIP's pick among K candidates (sample/best_of.py; candidate 0 is the plain image).
    """

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    controls: list[dict[str, Any]] = field(default_factory=list)
    scheduler: str = DEFAULT_SCHEDULER
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    seed: int = DEFAULT_SEED
    n: int = DEFAULT_N
    height: int | None = None
    width: int | None = None
    eta: float = DEFAULT_ETA
    model: str | None = None
    best_of: int = DEFAULT_BEST_OF
    # provenance: the model's short SHA-256 (models/sources.model_hash; a replay warns when it changed) and the LoRAs
    # fused into it, each {"path": ..., "scale": ...} (a replay fuses them again)
    model_hash: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)
    # the weights' precision it ran in ("fp32", "fp16", "bf16"; None: not recorded, i.e. fp32), which a replay keeps
    dtype: str | None = None

    def validate(self, limits: Limits | None = DEFAULT_LIMITS) -> GenerationRequest:
        """Raise InputError naming the first bad field and what is valid; returns self for chaining.

        `limits` bound the size and batch (None: no bound, for library callers who sized the request themselves).
        """
        self.validated_controls(limits)
        return self

    def validated_controls(self, limits: Limits | None = DEFAULT_LIMITS) -> list[Control]:
        """`validate`, returning the controls that checking the dicts built (their images decoded once): a caller
        that samples next passes them to `sample(bundle, request, controls)` with the dicts cleared, instead of
        letting the sampler build and decode them again."""
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, list):
                if not all(isinstance(p, str) for p in value):
                    raise InputError(f"{name} must be a string or a list of strings (one per image)")
            elif not isinstance(value, str):
                raise InputError(f"{name} must be a string or a list of n strings, got {type(value).__name__}")
        check_scheduler_name(self.scheduler)
        for name in ("steps", "n"):
            RANGES[name].check(getattr(self, name), name)
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.n:
                raise InputError(f"{name} is a list of {len(value)} prompts but n is {self.n}; give one per image")
        for name in ("best_of", "seed", "cfg", "eta"):
            RANGES[name].check(getattr(self, name), name)
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None:
                RANGES["side"].check(value, side)
        if limits is not None:
            limits.check(self)
        if self.model is not None and not isinstance(self.model, str):
            raise InputError(f"model must be a directory path string, got {type(self.model).__name__}")
        if self.model_hash is not None and not isinstance(self.model_hash, str):
            raise InputError(f"model_hash must be a string or null, got {type(self.model_hash).__name__}")
        if self.dtype not in (None, *DTYPES):
            raise InputError(f"dtype must be one of {', '.join(DTYPES)} or null, got {self.dtype!r}")
        if not isinstance(self.loras, list) or not all(
                isinstance(x, dict) and set(x) == {"path", "scale"} and isinstance(x["path"], str) and _real(x["scale"])
                for x in self.loras):
            raise InputError('loras must be a list of {"path": string, "scale": number} objects')
        if not isinstance(self.controls, list):
            raise InputError(f"controls must be a list of control objects, got {type(self.controls).__name__}")
        from mmsynth.sample.controls import controls_from_dicts

        return controls_from_dicts(self.controls)  # names, fields and option ranges

    def for_image(self, i: int) -> GenerationRequest:
        """The request that reproduces image i of this batch on its own (its seed, n = 1)."""
        from mmsynth.sample.controls import CONTROLS

        prompt = self.prompt[i] if isinstance(self.prompt, list) else self.prompt
        negative = self.negative_prompt[i] if isinstance(self.negative_prompt, list) else self.negative_prompt
        controls = []
        for c in self.controls:
            c = dict(c)
            cls = CONTROLS.get(c.get("name"))
            for key in getattr(cls, "per_image", ()):
                if key in c:
                    c[key] = cls.option_for_image(key, c[key], i)
            controls.append(c)
        return dataclasses.replace(self, prompt=prompt, negative_prompt=negative, seed=self.seed + i, n=1,
                                   controls=controls)

    def prompts(self) -> list[str]:
        """The prompt of each image."""
        return list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * self.n

    def negative_prompts(self) -> list[str]:
        """The negative prompt of each image."""
        neg = self.negative_prompt
        return list(neg) if isinstance(neg, list) else [neg] * self.n

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any, where: str = "request", limits: Limits | None = DEFAULT_LIMITS) -> GenerationRequest:
        """The request a JSON object describes, validated (errors start with `where`)."""
        return cls.load(d, where, limits)[0]

    @classmethod
    def load(cls, d: Any, where: str = "request",
             limits: Limits | None = DEFAULT_LIMITS) -> tuple[GenerationRequest, list[Control]]:
        """`from_dict` and the controls its dicts describe, built once (what a replay samples with)."""
        if not isinstance(d, dict):
            raise InputError(f"{where} must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise InputError(f"{where}: unsupported format {fmt!r}; expected {FORMAT!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise InputError(f"{where} has unknown field(s) {unknown}; valid: {', '.join(names)}")
        request = cls(**d)
        try:
            return request, request.validated_controls(limits)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "request", limits: Limits | None = DEFAULT_LIMITS) -> GenerationRequest:
        from mmsynth.io import parse_json

        return cls.from_dict(parse_json(text, where), where, limits)


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
