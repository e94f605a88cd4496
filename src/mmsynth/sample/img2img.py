"""Image-to-image (SDEdit): start from a noised encoding of an init image instead of pure noise.

Same semantics as diffusers' StableDiffusionImg2ImgPipeline, so results compare one to one: of
`steps` timesteps, the first (1 - strength) are skipped (int(steps * strength) are run), the init
image is encoded with image i's generator, and noised to the first remaining timestep.
strength 1 keeps nothing of the image's structure; small strengths only retouch it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.sample.controls import Control, check_batch_length, decode_array, is_number, register_control
from mmsynth.sample.request import DEFAULT_STRENGTH

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context


@register_control
@dataclass(kw_only=True)
class Img2Img(Control):
    """image: HxWx3 uint8 array, image path or PNG data URI, or a list of n of them (image i of the batch starts
    from image i); strength in (0, 1]."""

    name: ClassVar[str] = "img2img"
    per_image: ClassVar[tuple[str, ...]] = ("image",)

    image: Any = None
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self) -> None:
        s = self.strength
        if not is_number(s) or not 0 < s <= 1:
            raise InputError(f"strength must be a number in (0, 1] (1 = ignore the image's structure), got {s!r}")
        if self.image is None or (isinstance(self.image, list) and not self.image):
            raise InputError("img2img needs an init image (an image file path or an HxWx3 array)")
        if isinstance(self.image, list):
            self.image = [_as_rgb(decode_array(im, f"init image {i}")) if isinstance(im, (np.ndarray, torch.Tensor))
                          else im for i, im in enumerate(self.image)]  # fmt: skip
        elif isinstance(self.image, (np.ndarray, torch.Tensor)):
            self.image = _as_rgb(decode_array(self.image, "init image"))

    def pixels(self, height: int, width: int, n: int = 1) -> torch.Tensor:
        """The init image(s) as n x 3 x height x width in [-1, 1] (resized with Lanczos, like diffusers, if needed)."""
        if not isinstance(self.image, list):
            return self._pixels(self.image, height, width, "init image").repeat(n, 1, 1, 1)
        check_batch_length(self.image, n, "img2img", "init images")
        return torch.cat([self._pixels(im, height, width, f"init image {i}") for i, im in enumerate(self.image)])

    @staticmethod
    def _pixels(image: Any, height: int, width: int, what: str) -> torch.Tensor:
        arr = _as_rgb(decode_array(image, what))
        if arr.shape[:2] != (height, width):
            arr = np.asarray(Image.fromarray(arr).resize((width, height), Image.LANCZOS))
        x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        return 2.0 * x - 1.0

    def start(self, ctx: Context) -> bool:
        skip_to_strength(ctx, self.strength)
        n = ctx.request.n
        init = ctx.encode(self.pixels(ctx.height, ctx.width, n))
        t0 = ctx.timesteps[:1].repeat(n)
        ctx.latents = ctx.scheduler.add_noise(init, ctx.noise(init.shape), t0)
        return True


def skip_to_strength(ctx: Context, strength: float) -> None:
    """Run only the last kept_steps of the loop's timesteps (img2img, partial inversion): the scheduler starts
    at the first of them (`set_begin_index`, so multistep solvers index their sigmas right)."""
    steps = len(ctx.timesteps)
    skip = (steps - kept_steps(steps, strength)) * ctx.scheduler.order
    ctx.timesteps = ctx.scheduler.timesteps[skip:]
    if hasattr(ctx.scheduler, "set_begin_index"):
        ctx.scheduler.set_begin_index(skip)


def kept_steps(steps: int, strength: float) -> int:
    """How many of `steps` a run of `strength` executes (img2img's rule: int(steps * strength), at least 1 to run)."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise InputError(f"strength {strength} with {steps} steps runs no step; raise strength or steps "
                         "(strength * steps must be >= 1)")
    return kept


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise InputError(f"init image must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"init image must be HxWx3 (RGB), got shape {arr.shape}")
    if arr.shape[2] == 4:
        from mmsynth.io import to_rgb_uint8

        arr = to_rgb_uint8(Image.fromarray(arr, "RGBA"))
    return arr
