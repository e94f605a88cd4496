"""DDIM inversion through the one loop run backwards, reconstruction from x_T, and prompt-swap editing.

Inversion is not a second sampler: `DDIMInversion` is a control whose `start` hook encodes the image
(the VAE posterior mean: deterministic, seed-free), swaps the loop's scheduler for diffusers'
`DDIMInverseScheduler` on the same noise schedule and hands the loop its ascending timesteps; the loop
then runs exactly as when sampling (same branches, same CFG sum, same controls' model inputs), from x0
to x_T. CFG 1 by default (DDIM inversion drifts at high CFG). Controls that repeat steps cannot run
backwards (re-noising goes the wrong way) and are refused. During inversion a Step's alpha_bar is that
of the timestep the model is evaluated at (DDIMInverseScheduler's target level), alpha_bar_prev the next one.

- partial inversion (`strength` < 1): run only the first int(steps * strength) inverse steps, to the
  noise level at which img2img of that strength starts, and edit from there; like SDEdit, but the
  starting latent is the image's own deterministic trajectory instead of fresh noise, so what the
  edit does not change is kept (structure survives far better than from a full x_T at CFG > 1);
- `InitialLatents`  start sampling from given latents (an x_T), like diffusers' `latents=` argument;
- `InvertedLatents` start from the inversion of an image (inverts in `start`): a self-contained,
  replayable edit request (the image is embedded as PNG);
- `SourceAttention` keep the SOURCE's self-attention structure for the first `until` fraction of the
  steps: a nested reconstruction with the source prompt records every self-attention layer's queries
  and keys (forward hooks on `attn1.to_q` / `attn1.to_k` of diffusers' `Attention` modules, so the
  attention processors themselves are untouched), and the edit pass replays them; the maps
  softmax(q k^T) are then the source's while the values (content) come from the edited prompt.
  This is the Plug-and-Play / MasaCtrl-style "inject self-attention queries and keys" variant.
- `SourceCrossAttention` prompt-to-prompt word swap: the same nested source run records every
  cross-attention layer's probabilities, and the edit replays them for the first `until` of the steps.
- Negative-prompt inversion (Miyake et al. 2023): reconstruct or edit with the SOURCE prompt as the
  negative prompt, so CFG > 1 does not amplify the inversion's drift (`negative_prompt_inversion=True`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mmsynth.errors import InputError
from mmsynth.sample.controls import (
    Control,
    Step,
    check_batch_length,
    decode_array,
    is_integer,
    is_number,
    register_control,
)
from mmsynth.sample.img2img import _as_rgb, kept_steps, skip_to_strength
from mmsynth.sample.request import GenerationRequest

if TYPE_CHECKING:
    from mmsynth.models.bundle import Bundle
    from mmsynth.sample.sampler import Context, SampleResult

LATENTS_FORMAT = "mmsynth.latents/1"


def image_pixels(image: Any, height: int, width: int, what: str) -> torch.Tensor:
    """An image option as 1 x 3 x H x W in [-1, 1]; it must already be height x width (no silent resize)."""
    arr = _as_rgb(np.asarray(decode_array(image, what)))
    if arr.shape[:2] != (height, width):
        raise InputError(f"{what} is {arr.shape[1]}x{arr.shape[0]} but the request generates {width}x{height}; "
                         "resize the image or set --width/--height to its size")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def encode_mean(ctx: Context, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of the VAE posterior MEAN (deterministic: inversion and blending must not draw noise)."""
    vae = ctx.bundle.vae
    pixels = pixels.to(device=ctx.device, dtype=ctx.dtype)
    return vae.config.scaling_factor * vae.encode(pixels).latent_dist.mode()


# ---------------------------------------------------------------------------------------------- controls
@register_control
@dataclass(kw_only=True)
class DDIMInversion(Control):
    """Run the loop backwards from `image` (HxWx3 uint8, path or PNG data URI) to x_T with DDIMInverseScheduler.

    `image` may also be a list of n images: image i of the batch inverts image i (with prompt i).
    strength in (0, 1]: the fraction of the steps to invert (1 = all the way to x_T; 0.6 stops where img2img
    at strength 0.6 starts).
    """

    name: ClassVar[str] = "ddim-inversion"
    per_image: ClassVar[tuple[str, ...]] = ("image",)

    image: Any = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if self.image is None or (isinstance(self.image, list) and not self.image):
            raise InputError("ddim-inversion needs the image to invert")
        if isinstance(self.image, list):
            self.image = [_as_rgb(np.asarray(decode_array(im, f"image {i} to invert"))) for i, im in
                          enumerate(self.image)]  # fmt: skip
        elif isinstance(self.image, (np.ndarray, torch.Tensor)):
            self.image = _as_rgb(np.asarray(decode_array(self.image, "image to invert")))

    def start(self, ctx: Context) -> bool:
        from diffusers import DDIMInverseScheduler

        if ctx.request.scheduler != "ddim":
            raise InputError(f"inversion is DDIM inversion: use scheduler 'ddim' (got {ctx.request.scheduler!r}); "
                             "the reconstruction may use any scheduler")
        if ctx.request.eta != 0:
            raise InputError(f"DDIM inversion is deterministic: eta must be 0, got {ctx.request.eta}")
        rewinders = [c.name for c in ctx.controls if c.recurrence() > 1]
        if rewinders:
            raise InputError(f"self-recurrence (repeated steps in {', '.join(rewinders)}) cannot run during inversion: "
                             "re-noising a step only makes sense going from noise to image")
        inverse = DDIMInverseScheduler.from_config(ctx.scheduler.config)
        inverse.set_timesteps(len(ctx.timesteps), device=ctx.device)
        ctx.scheduler, ctx.timesteps = inverse, inverse.timesteps[: kept_steps(len(ctx.timesteps), self.strength)]
        n = ctx.request.n
        check_batch_length(self.image, n, "ddim-inversion", "images")
        if isinstance(self.image, list):
            pixels = torch.cat([image_pixels(im, ctx.height, ctx.width, f"image {i} to invert")
                                for i, im in enumerate(self.image)])  # fmt: skip
            ctx.latents = torch.cat([encode_mean(ctx, pixels[i: i + 1]) for i in range(n)])  # as alone
        else:
            x0 = encode_mean(ctx, image_pixels(self.image, ctx.height, ctx.width, "image to invert"))
            ctx.latents = x0.repeat(n, 1, 1, 1)
        return True


@register_control
@dataclass(kw_only=True)
class InitialLatents(Control):
    """Start from given latents (1 or n x C x h x w array/tensor, or an x_T .safetensors path) instead of noise.

    Like diffusers' `latents=` argument, they are multiplied by the scheduler's init_noise_sigma (1 for
    DDIM, DPM-Solver, UniPC), so an x_T from DDIM inversion also starts Euler at the right scale.
    """

    name: ClassVar[str] = "latents"

    latents: Any = None

    def __post_init__(self) -> None:
        if self.latents is None:
            raise InputError("latents: give an array of initial latents or an x_T .safetensors file")
        if isinstance(self.latents, str):
            self.latents = load_latents(self.latents)[0].numpy()
        arr = np.asarray(self.latents.detach().cpu() if isinstance(self.latents, torch.Tensor) else self.latents)
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"latents must be a float array n x C x h x w, got shape {arr.shape} ({arr.dtype})")
        if not np.isfinite(arr).all():
            raise InputError("latents hold NaN or infinite values; x_T must be finite")
        self.latents = arr.astype(np.float32)

    def start(self, ctx: Context) -> bool:
        x = torch.from_numpy(self.latents)
        check_latent_shape(x, ctx.latent_shape, "latents")
        if x.shape[0] == 1 and ctx.request.n > 1:
            x = x.repeat(ctx.request.n, 1, 1, 1)
        ctx.latents = x.to(device=ctx.device, dtype=ctx.dtype) * ctx.scheduler.init_noise_sigma
        return True


def check_strength(strength: Any) -> None:
    if not is_number(strength) or not 0 < strength <= 1:
        raise InputError(f"inversion strength must be a number in (0, 1] (the fraction of the steps to invert; "
                         f"1 = all the way to x_T), got {strength!r}")


def check_latent_shape(x: torch.Tensor, shape: tuple[int, int, int, int], what: str) -> None:
    n, c, h, w = shape
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w) or x.shape[0] not in (1, n):
        raise InputError(f"{what} have shape {tuple(x.shape)}; this model and size need (1 or {n}) x {c} x {h} x {w} "
                         f"(an x_T inverted with another model or image size?)")


@register_control
@dataclass(kw_only=True)
class InvertedLatents(Control):
    """Start from the DDIM inversion of `image` under `source_prompt` (inverts once, in `start`).

    inversion_cfg: the guidance scale of the inversion (1 = plain DDIM inversion, the default).
    strength in (0, 1]: invert only that fraction of the steps and sample only the remaining ones (partial
    inversion; 1 = from x_T). The inversion uses the run's own step count, so the two grids of timesteps match.
    image and source_prompt may be lists of n (image i of the batch starts from source i's inversion).
    """

    name: ClassVar[str] = "inverted-latents"
    per_image: ClassVar[tuple[str, ...]] = ("image", "source_prompt")

    image: Any = None
    source_prompt: str = ""
    inversion_cfg: float = 1.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if self.image is None or (isinstance(self.image, list) and not self.image):
            raise InputError("inverted-latents needs the source image")
        if isinstance(self.image, list):
            if not isinstance(self.source_prompt, list) or len(self.source_prompt) != len(self.image):
                raise InputError("inverted-latents with a list of images needs a list of as many source prompts")
            self.image = [_as_rgb(np.asarray(decode_array(im, f"source image {i}"))) for i, im in
                          enumerate(self.image)]  # fmt: skip
        elif isinstance(self.image, (np.ndarray, torch.Tensor)):
            self.image = _as_rgb(np.asarray(decode_array(self.image, "source image")))
        _check_prompts(self.source_prompt, "source_prompt", "the source image's caption")
        self._cache: dict[Any, torch.Tensor] = {}

    def start(self, ctx: Context) -> bool:
        key = self.cache_key(ctx)
        if key not in self._cache:
            self._cache[key] = invert(ctx.bundle, self.image, self.source_prompt, steps=len(ctx.timesteps),
                                      cfg=self.inversion_cfg, height=ctx.height, width=ctx.width,
                                      strength=self.strength).latents  # fmt: skip
        self.begin(ctx, self._cache[key])
        return True

    def cache_key(self, ctx: Context) -> tuple:
        """What the inversion depends on besides the image (fields may change between runs)."""
        return len(ctx.timesteps), ctx.height, ctx.width, id(ctx.bundle), self.strength, self.inversion_cfg

    def begin(self, ctx: Context, x: torch.Tensor) -> None:
        """Start the run from the inverted latents `x` (at the level the inversion reached, for strength < 1)."""
        check_latent_shape(x, ctx.latent_shape, "the inverted latents")
        x = x if x.shape[0] == ctx.request.n else x.repeat(ctx.request.n, 1, 1, 1)
        scale = ctx.scheduler.init_noise_sigma
        if self.strength < 1:  # start where img2img of this strength starts, at the level the inversion reached
            skip_to_strength(ctx, self.strength)
            if ctx.sigma_space:  # x0 + sigma * eps = x_t / sqrt(abar_t)
                scale = 1.0 / math.sqrt(float(ctx.scheduler.alphas_cumprod[int(ctx.timesteps[0])]))
        ctx.latents = x.to(ctx.device, ctx.dtype) * scale


def _check_prompts(value: Any, name: str, what: str) -> None:
    if not (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))):
        raise InputError(f"{name} must be a string ({what}) or a list of them, one per image")


# ---------------------------------------------------------------------------------------------- attention
def attention_modules(unet: torch.nn.Module, which: str = "attn1") -> dict[str, torch.nn.Module]:
    """The UNet's self- ("attn1") or cross-attention ("attn2") modules, as diffusers names them in every
    transformer block."""
    return {name: m for name, m in unet.named_modules() if name.endswith(which) and hasattr(m, "to_q")}


def patch_cross_attention_scores(unet: torch.nn.Module, wrap: Callable[[str, Any], Any]) -> Callable[[], None]:
    """Run every attn2 with diffusers' classic `AttnProcessor`, its `get_attention_scores` replaced by
    `wrap(layer, scores)` (an instance attribute); returns the undo, which restores both."""
    from diffusers.models.attention_processor import AttnProcessor

    modules = attention_modules(unet, "attn2")
    processors = dict(unet.attn_processors)
    unet.set_attn_processor({key: AttnProcessor() if key.removesuffix(".processor") in modules else proc
                             for key, proc in processors.items()})  # fmt: skip
    previous = {name: mod.__dict__.get("get_attention_scores") for name, mod in modules.items()}
    for name, mod in modules.items():
        mod.get_attention_scores = wrap(name, mod.get_attention_scores)

    def undo() -> None:
        for name, mod in modules.items():
            if previous[name] is None:
                mod.__dict__.pop("get_attention_scores", None)
            else:
                mod.get_attention_scores = previous[name]
        unet.set_attn_processor(processors)

    return undo


def self_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return attention_modules(unet, "attn1")


@dataclass(kw_only=True)
class _AttentionTap(Control):
    """Internal (not registered): sees attention tensors per (step, layer, part), told the step by `inputs`.

    kind "self": the outputs of every attn1's to_q and to_k (forward hooks on diffusers' projections, the
    processors untouched); kind "cross": every attn2's attention probabilities (diffusers' classic
    `AttnProcessor` runs attn2 while the tap is installed, its `get_attention_scores` wrapped).
    With `store` None it records (the tensors of the steps before `until`); given a store, it replays:
    each stored tensor replaces the one computed at the same step and layer.
    """

    name: ClassVar[str] = "attention-tap"
    kind: str = "self"
    until: float = 0.5
    store: dict[tuple[int, str, str], torch.Tensor] | None = None

    def prepare(self, ctx: Context) -> None:
        self.install(ctx)

    def install(self, ctx: Context) -> None:
        self._recording = self.store is None
        self._kept: dict[tuple[int, str, str], torch.Tensor] = {} if self.store is None else self.store
        self._step: Step | None = None
        unet = ctx.unet
        if self.kind == "self":
            self._handles = [getattr(mod, proj).register_forward_hook(self._hook(name, proj))
                             for name, mod in attention_modules(unet, "attn1").items()
                             for proj in ("to_q", "to_k")]  # fmt: skip
            return
        self._undo = patch_cross_attention_scores(unet, self._scores)

    def _tap(self, layer: str, part: str, x: torch.Tensor) -> torch.Tensor:
        step = self._step
        if step is None:
            return x
        if self._recording:
            if step.fraction < self.until:
                self._kept[(step.index, layer, part)] = x.detach()
            return x
        kept = self._kept.get((step.index, layer, part))
        return kept if kept is not None and kept.shape == x.shape else x

    def _hook(self, layer: str, proj: str) -> Any:
        return lambda module, args, output: self._tap(layer, proj, output)

    def _scores(self, layer: str, scores: Any) -> Any:
        return lambda query, key, attention_mask=None: self._tap(layer, "probs", scores(query, key, attention_mask))

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> None:
        self._step = step
        return None

    def close(self, ctx: Context) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        if getattr(self, "_undo", None) is not None:
            self._undo()
            self._undo = None


@dataclass(kw_only=True)
class _SourceReplay(Control):
    """Shared by SourceAttention and SourceCrossAttention: in `prepare` a nested run of the same request under
    `source_prompt` (same starting latents and other controls) records the source's attention; the edit pass
    then replays it for the first `until` fraction of the steps. Costs one extra run."""

    per_image: ClassVar[tuple[str, ...]] = ("source_prompt",)
    kind: ClassVar[str] = "self"

    source_prompt: str | list[str] = ""  # or one per image
    until: float = 0.5

    def __post_init__(self) -> None:
        _check_prompts(self.source_prompt, f"{self.name} source_prompt", "the source image's caption")
        if not is_number(self.until) or not 0 <= self.until <= 1:
            raise InputError(f"{self.name} until must be a fraction of the steps in [0, 1], got {self.until!r}")

    def prepare(self, ctx: Context) -> None:
        from mmsynth.sample.sampler import sample

        check_batch_length(self.source_prompt, ctx.request.n, self.name, "source prompts")
        self.check_prompts(ctx)
        recorder = _AttentionTap(kind=self.kind, until=float(self.until))
        others = [c for c in ctx.controls if not isinstance(c, _SourceReplay)]  # each replay records alone
        source = dataclasses.replace(ctx.request, prompt=self.source_prompt, controls=[])
        sample(ctx.bundle, source, [*others, recorder], progress=False, decode=False)
        self._replay = _AttentionTap(kind=self.kind, until=float(self.until), store=recorder._kept)
        self._replay.install(ctx)

    def check_prompts(self, ctx: Context) -> None:
        """Refuse source/edit prompt pairs the replay cannot align (nothing to check for self-attention)."""

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> None:
        return self._replay.inputs(ctx, step, branch, latents)

    def close(self, ctx: Context) -> None:
        if getattr(self, "_replay", None) is not None:
            self._replay.close(ctx)
            self._replay = None


@register_control
@dataclass(kw_only=True)
class SourceAttention(_SourceReplay):
    """Keep the source's self-attention maps (queries and keys of every attn1) for the first `until` fraction of
    the steps: the structure of the source, the content of the edited prompt (Plug-and-Play / MasaCtrl-style)."""

    name: ClassVar[str] = "source-attention"
    kind: ClassVar[str] = "self"


@register_control
@dataclass(kw_only=True)
class SourceCrossAttention(_SourceReplay):
    """Prompt-to-prompt word swap (Hertz et al. 2022): for the first `until` fraction of the steps the edited
    prompt's cross-attention maps are the source prompt's, so each swapped word attends where the word it
    replaces did (layout kept, the new word's content written there). Prompts must have the same number of
    tokens (words swapped one for one); attn2 runs diffusers' classic AttnProcessor meanwhile."""

    name: ClassVar[str] = "source-cross-attention"
    kind: ClassVar[str] = "cross"
    until: float = 0.8

    def check_prompts(self, ctx: Context) -> None:
        tok = ctx.bundle.tokenizer
        n = ctx.request.n
        sources = self.source_prompt if isinstance(self.source_prompt, list) else [self.source_prompt] * n
        edits = ctx.request.prompt if isinstance(ctx.request.prompt, list) else [ctx.request.prompt] * n
        for source, edit in zip(sources, edits):
            a, b = (len(tok(text, truncation=True).input_ids) for text in (source, edit))
            if a != b:
                raise InputError(f"{self.name} swaps words one for one: '{source}' has {a} tokens but '{edit}' has "
                                 f"{b}; give prompts that differ only by swapped words")


# ---------------------------------------------------------------------------------------------- functions
@dataclass
class InversionResult:
    """latents: x_T (n x C x h x w); request: the request that reproduces image 0's (`sample(..., decode=False)`),
    requests: each image's."""

    latents: torch.Tensor
    request: GenerationRequest
    requests: list[GenerationRequest] = field(default_factory=list)


def invert(bundle: Bundle, image: Any, prompt: str | list[str], steps: int = 50, cfg: float = 1.0,
           negative_prompt: str = "", controls: list[Control] | None = None, height: int | None = None,
           width: int | None = None, progress: bool = False, strength: float = 1.0) -> InversionResult:
    """DDIM-invert `image` under `prompt` through the one loop; other controls add their inputs as when sampling.

    A list of n images with a list of n prompts inverts them as one batch (image i under prompt i, as alone).
    strength < 1 stops after that fraction of the steps (partial inversion, see `InvertedLatents`).
    """
    from mmsynth.sample.sampler import sample

    images = list(image) if isinstance(image, list) else [image]
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            from mmsynth.io import load_image

            im = load_image(im, "image to invert")
        images[i] = _as_rgb(np.asarray(im))
    if isinstance(image, list) and (not isinstance(prompt, list) or len(prompt) != len(images)):
        raise InputError(f"inverting {len(images)} images needs a list of {len(images)} prompts, one per image")
    first = images[0]
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, scheduler="ddim", steps=steps,
                                cfg=cfg, n=len(images), height=height or first.shape[0], width=width or first.shape[1])
    inversion = DDIMInversion(image=images if isinstance(image, list) else first, strength=strength)
    result = sample(bundle, request, [inversion, *(controls or [])], progress=progress, decode=False)
    return InversionResult(result.latents, result.requests[0], result.requests)


def reconstruct(bundle: Bundle, latents: torch.Tensor, prompt: str | list[str], steps: int = 50, cfg: float = 1.0,
                scheduler: str = "ddim", negative_prompt_inversion: bool = False,
                controls: list[Control] | None = None, progress: bool = False) -> SampleResult:
    """Sample from x_T with the source prompt (negative_prompt_inversion: the prompt is also the negative).

    n latents may come with a list of n prompts (latent i under prompt i)."""
    from mmsynth.sample.sampler import sample

    f = bundle.vae_scale_factor
    request = GenerationRequest(prompt=prompt, negative_prompt=prompt if negative_prompt_inversion else "",
                                scheduler=scheduler, steps=steps, cfg=cfg, n=latents.shape[0],
                                height=latents.shape[-2] * f, width=latents.shape[-1] * f)
    return sample(bundle, request, [InitialLatents(latents=latents), *(controls or [])], progress=progress)


def edit_request(image: Any, source_prompt: str | list[str], prompt: str | list[str], steps: int = 50,
                 cfg: float = 5.0, seed: int = 0, scheduler: str = "ddim", keep_attention: float = 0.0,
                 cross_attention: float = 0.0,
                 negative_prompt_inversion: bool = True, inversion_cfg: float = 1.0,
                 model: str | None = None, strength: float = 1.0, null_text: int = 0,
                 recolour: int = 0) -> GenerationRequest:
    """The self-contained, replayable request of a prompt-swap edit (invert with source_prompt, sample with prompt).

    Lists of n images, source prompts and prompts edit n images as one batch (image i as alone, seed + i).
    strength < 1: partial inversion (invert that fraction of the steps, edit only those). keep_attention /
    cross_attention: replay the source's self- / cross-attention for that fraction of the steps (0 = off).
    null_text N > 0: null-text inversion with N Adam steps per step (`NullTextInversion`; it tunes the
    unconditional branch from the empty prompt, so negative_prompt_inversion does not apply).
    recolour M > 0: the prompts differ by one colour word; universal guidance (M backward steps of the region guide,
    confined to the old colour's pixels) draws the new colour where the old one was (`recolour.py`).
    """
    batch = isinstance(image, list)
    images = [_as_rgb(np.asarray(im)) for im in (image if batch else [image])]
    n = len(images)
    for name, value in (("source_prompt", source_prompt), ("prompt", prompt)):
        if batch != isinstance(value, list) or (batch and len(value) != n):
            raise InputError(f"edit: give one image and one {name}, or lists of equally many (one per image)")
    source: Any = images if batch else images[0]
    if not is_integer(null_text) or null_text < 0:
        raise InputError(f"null_text (Adam steps per step; 0 = off) must be an integer >= 0, got {null_text!r}")
    start: Control
    if null_text:
        from mmsynth.sample.null_text import NullTextInversion

        start = NullTextInversion(image=source, source_prompt=source_prompt, inversion_cfg=inversion_cfg,
                                  strength=strength, inner_steps=null_text)
        negative_prompt_inversion = False
    else:
        start = InvertedLatents(image=source, source_prompt=source_prompt, inversion_cfg=inversion_cfg,
                                strength=strength)
    controls: list[Control] = [start]
    if keep_attention > 0:
        controls.append(SourceAttention(source_prompt=source_prompt, until=keep_attention))
    if cross_attention > 0:
        controls.append(SourceCrossAttention(source_prompt=source_prompt, until=cross_attention))
    if not is_integer(recolour) or recolour < 0:
        raise InputError(f"recolour (backward guidance steps per step; 0 = off) must be an integer >= 0, "
                         f"got {recolour!r}")
    if recolour:
        from mmsynth.sample.recolour import recolour_guidance

        controls.append(recolour_guidance(source, source_prompt, prompt, m=recolour))
    request = GenerationRequest(prompt=prompt, negative_prompt=source_prompt if negative_prompt_inversion else "",
                                controls=[c.to_dict() for c in controls], scheduler=scheduler, steps=steps, cfg=cfg,
                                seed=seed, n=n, height=images[0].shape[0], width=images[0].shape[1], model=model)
    return request.validate(limits=None)  # the caller bounds the size (the CLI by its --max-side)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between two uint8 images (over the pixels where mask is true, if given); inf when equal."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    mse = float(d.mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------------------------- x_T files
def save_latents(latents: torch.Tensor, path: str | Path, request: GenerationRequest, model: str | None = None) -> None:
    """Write x_T and the request that produced it (JSON, in the safetensors metadata) atomically."""
    from safetensors.torch import save_file

    from mmsynth.io import atomic_path

    meta = {"format": LATENTS_FORMAT, "request": request.to_json(), "model": model or request.model or ""}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.detach().cpu().float().contiguous()}, str(tmp), metadata=meta)


def load_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(x_T, metadata with the inversion request decoded) from a file written by `save_latents`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(f"latents file '{p}' does not exist (expected an x_T .safetensors from `mmsynth invert`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "latents" not in set(f.keys()):
                raise InputError(f"latents file '{p}' has no 'latents' tensor (not written by `mmsynth invert`)")
            x = f.get_tensor("latents")
    except InputError:
        raise
    except Exception:
        raise InputError(f"latents file '{p}' is not a readable safetensors file") from None
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise InputError(f"latents file '{p}' holds NaN, infinite or non-float values; x_T must be finite floats")
    if "request" in meta:
        from mmsynth.io import parse_json

        meta["request"] = parse_json(meta["request"], f"latents file '{p}': its 'request' metadata")
    if meta.get("format", LATENTS_FORMAT) != LATENTS_FORMAT:
        raise InputError(f"latents file '{p}' has format {meta['format']!r}; expected {LATENTS_FORMAT!r} (an x_T "
                         "written by `mmsynth invert`)")
    return x, meta
