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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mmsynth.errors import InputError
from mmsynth.sample.controls import (
    Control,
    check_batch_length,
    decode_array,
    is_number,
    register_control,
)
from mmsynth.sample.img2img import _as_rgb, kept_steps, skip_to_strength
from mmsynth.sample.request import DEFAULT_INVERSION_CFG, DEFAULT_INVERSION_STEPS, DEFAULT_SCHEDULER, GenerationRequest

if TYPE_CHECKING:
    from mmsynth.models.bundle import Bundle
    from mmsynth.sample.sampler import Context, SampleResult

def image_pixels(image: Any, height: int, width: int, what: str) -> torch.Tensor:
    """An image option as 1 x 3 x H x W in [-1, 1]; it must already be height x width (no silent resize)."""
    arr = _as_rgb(np.asarray(decode_array(image, what)))
    if arr.shape[:2] != (height, width):
        raise InputError(f"{what} is {arr.shape[1]}x{arr.shape[0]} but the request generates {width}x{height}; "
                         "resize the image or set --width/--height to its size")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


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
            ctx.latents = torch.cat([ctx.encode_mean(pixels[i: i + 1]) for i in range(n)])  # as alone
        else:
            x0 = ctx.encode_mean(image_pixels(self.image, ctx.height, ctx.width, "image to invert"))
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
            from mmsynth.sample.latents_file import load_latents

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
    inversion_cfg: float = DEFAULT_INVERSION_CFG
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
        check_prompt_option(self.source_prompt, "source_prompt", "the source image's caption")
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


def check_prompt_option(value: Any, name: str, what: str) -> None:
    if not (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))):
        raise InputError(f"{name} must be a string ({what}) or a list of them, one per image")


# ---------------------------------------------------------------------------------------------- functions
@dataclass
class InversionResult:
    """latents: x_T (n x C x h x w); request: the request that reproduces image 0's (`sample(..., decode=False)`),
    requests: each image's."""

    latents: torch.Tensor
    request: GenerationRequest
    requests: list[GenerationRequest] = field(default_factory=list)


def invert(bundle: Bundle, image: Any, prompt: str | list[str], steps: int = DEFAULT_INVERSION_STEPS,
           cfg: float = DEFAULT_INVERSION_CFG,
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


def reconstruct(bundle: Bundle, latents: torch.Tensor, prompt: str | list[str], steps: int = DEFAULT_INVERSION_STEPS,
                cfg: float = DEFAULT_INVERSION_CFG, scheduler: str = DEFAULT_SCHEDULER,
                negative_prompt_inversion: bool = False,
                controls: list[Control] | None = None, progress: bool = False) -> SampleResult:
    """Sample from x_T with the source prompt (negative_prompt_inversion: the prompt is also the negative).

    n latents may come with a list of n prompts (latent i under prompt i)."""
    from mmsynth.sample.sampler import sample

    f = bundle.vae_scale_factor
    request = GenerationRequest(prompt=prompt, negative_prompt=prompt if negative_prompt_inversion else "",
                                scheduler=scheduler, steps=steps, cfg=cfg, n=latents.shape[0],
                                height=latents.shape[-2] * f, width=latents.shape[-1] * f)
    return sample(bundle, request, [InitialLatents(latents=latents), *(controls or [])], progress=progress)
