"""Blended-latent inpainting (Avrahami et al.): repaint a masked region with ANY text-to-image model.

No inpainting UNet is needed: after every scheduler step the known region (mask 0) of the latent is
replaced by the source image's latent noised to the next timestep (`scheduler.add_noise`), so the
model only ever invents the masked region while seeing a consistent surrounding; after decoding, the
known pixels are pasted back exactly, with the seam feathered INSIDE the mask (pixels outside the
mask are the source's, bit for bit).

With an inpainting UNet (Stable Diffusion inpainting's layout: the latents plus the mask and the masked
image's latents, 2C + 1 input channels), the control also gives it those channels (`inputs`), so the model
sees what is kept at every step instead of only through the blend. A bundle may carry one beside its
text-to-image UNet (`unet_inpainting/`, made by `mmsynth train inpaint`): `unet="auto"` calls it when it is
there, `"inpainting"` requires it, `"base"` blends with the text-to-image UNet alone.

Mask convention (diffusers'): white / 1 = repaint, black / 0 = keep. The mask must be binary and the
source image's size. Hooks used: `unet_name` (which UNet), `prepare` (encode the source), `inputs` (the
inpainting UNet's channels), `after_step` (blend), `decoded` (paste), and for RePaint-style resampling
(Lugmayr et al. 2022) `repeats` or `jump`.
It composes with text, img2img (start from the noised source: `Img2Img` with the same image) and
universal guidance (its gradient sees the blended latents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.errors import InputError
from mmsynth.models.bundle import INPAINTING_UNET
from mmsynth.sample.controls import (
    MAX_PASSES,
    Control,
    ModelInputs,
    Step,
    check_batch_length,
    decode_array,
    is_integer,
    is_number,
    register_control,
)
from mmsynth.sample.img2img import _as_rgb
from mmsynth.sample.inversion import image_pixels

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context


def binary_mask(value: Any, what: str = "mask", white: str = "repaint") -> np.ndarray:
    """An HxW bool mask from a binary image (values {0, 1} or {0, 255}; RGB masks must be grey); `white` says what
    white means to the caller's user (inpainting: repaint; a control's region: where it acts)."""
    arr = np.asarray(decode_array(value, what))
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (arr == arr[..., :1]).all():
            raise InputError(f"{what} must be a black-and-white image (got colours)")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{what} must be an HxW image, got shape {arr.shape}")
    values = set(np.unique(arr).tolist())
    if arr.dtype == bool:
        return arr
    if not (values <= {0, 1} or values <= {0, 255}):
        shown = sorted(values)[:6]
        raise InputError(f"{what} must be binary (only 0 and 255, or 0 and 1; white = {white}), got values {shown}"
                         f"{' ...' if len(values) > 6 else ''}")
    return arr > 0


@register_control
@dataclass(kw_only=True)
class BlendedInpaint(Control):
    """image: the source (HxWx3); mask: HxW binary, white = repaint; feather: seam width in pixels (0 = hard);
    paste: paste the known pixels back after decoding (False shows what latent blending alone keeps);
    resample r: RePaint-style resampling, every step run r times (jump_length 1: each step redone from its
    re-noised blend) or every stretch of jump_length steps run r times (re-noised back over the stretch), over
    the first resample_until of the steps. unet: "auto" (the bundle's inpainting UNet when it has one), "inpainting"
    (require it) or "base" (the text-to-image UNet, latent blending alone). blend: replace the known latent region
    by the noised source after every step (False: leave the known region to an inpainting UNet, as diffusers'
    inpainting pipeline does; the paste-back still keeps the known pixels).
    image and mask may also be lists of n (image i of the batch inpaints source i under mask i)."""

    name: ClassVar[str] = "inpaint"
    per_image: ClassVar[tuple[str, ...]] = ("image", "mask")

    image: Any = None
    mask: Any = None
    feather: float = 2.0
    paste: bool = True
    resample: int = 1
    resample_until: float = 1.0
    jump_length: int = 1
    unet: str = "auto"
    blend: bool = True

    def __post_init__(self) -> None:
        empty = [v is None or (isinstance(v, list) and not v) for v in (self.image, self.mask)]
        if any(empty):
            raise InputError("inpainting needs a source image and a mask (white = repaint)")
        if isinstance(self.image, list) != isinstance(self.mask, list) or (
                isinstance(self.image, list) and len(self.image) != len(self.mask)):
            raise InputError("inpainting: give one image and one mask, or lists of equally many (one per image)")
        images = list(self.image) if isinstance(self.image, list) else [self.image]
        masks = list(self.mask) if isinstance(self.mask, list) else [self.mask]
        for i, (image, mask) in enumerate(zip(images, masks)):
            if isinstance(image, (np.ndarray, torch.Tensor)):
                images[i] = image = _as_rgb(np.asarray(decode_array(image, "inpaint image")))
            if isinstance(mask, (np.ndarray, torch.Tensor)):
                masks[i] = mask = binary_mask(mask).astype(np.uint8) * 255
                if isinstance(image, np.ndarray) and mask.shape != image.shape[:2]:
                    raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                     f"{image.shape[1]}x{image.shape[0]}; they must have the same size")
        self.image, self.mask = (images, masks) if isinstance(self.image, list) else (images[0], masks[0])
        if not isinstance(self.feather, (int, float)) or isinstance(self.feather, bool) or not (
                math.isfinite(self.feather) and self.feather >= 0):
            raise InputError(f"feather must be a number of pixels >= 0, got {self.feather!r}")
        if not isinstance(self.paste, bool):
            raise InputError(f"paste must be true or false, got {self.paste!r}")
        if not is_integer(self.resample) or not 1 <= self.resample <= MAX_PASSES:
            raise InputError(f"resample (passes per step, RePaint) must be an integer in [1, {MAX_PASSES}], got "
                             f"{self.resample!r}")
        if not is_number(self.resample_until) or not 0 <= self.resample_until <= 1:
            raise InputError(f"resample_until must be a fraction of the steps in [0, 1], got {self.resample_until!r}")
        j = self.jump_length
        if not is_integer(j) or j < 1:
            raise InputError(f"jump_length (steps redone at once when resampling) must be an integer >= 1, got {j!r}")
        if not isinstance(self.blend, bool):
            raise InputError(f"blend must be true or false, got {self.blend!r}")
        self._check_unet()

    def _check_unet(self) -> None:
        if self.unet not in UNET_CHOICES:
            raise InputError(f"unet must be one of {', '.join(UNET_CHOICES)}, got {self.unet!r}")

    def unet_name(self, bundle: Any) -> str | None:
        has = INPAINTING_UNET in getattr(bundle, "extras", {})  # (asks without loading it)
        if self.unet == "inpainting" and not has:
            raise InputError(f"unet 'inpainting': this model has no {INPAINTING_UNET}/ (train one with `mmsynth "
                             "train inpaint`), or use unet 'base' (latent blending with the text-to-image UNet)")
        return INPAINTING_UNET if has and self.unet != "base" else None

    def repeats(self, ctx: Context, step: Step) -> int:
        return self.resample if self.jump_length == 1 and step.fraction < self.resample_until else 1

    def jump(self, ctx: Context, step: Step) -> int:
        """jump_length j > 1: after every j-th step go back j steps, until each stretch has run `resample` times."""
        j = self.jump_length
        if j == 1 or self.resample == 1 or (step.index + 1) % j:
            return 0
        if (step.index + 1 - j) / step.count >= self.resample_until:
            return 0
        done = self._jumps.get(step.index, 0)
        if done + 1 >= self.resample:
            return 0
        self._jumps[step.index] = done + 1
        return j

    def recurrence(self) -> int:
        return self.resample

    def prepare(self, ctx: Context) -> None:
        self._jumps: dict[int, int] = {}  # step index -> jumps made back from it
        images = self.image if isinstance(self.image, list) else [self.image]
        masks = self.mask if isinstance(self.mask, list) else [self.mask]
        check_batch_length(self.image, ctx.request.n, "inpainting", "images")
        pixels, sources, latent_masks, pastes, repaint = [], [], [], [], []
        for raw_image, raw_mask in zip(images, masks):
            mask = binary_mask(raw_mask, "mask")
            image = _as_rgb(np.asarray(decode_array(raw_image, "inpaint image")))
            if mask.shape != image.shape[:2]:
                raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                 f"{image.shape[1]}x{image.shape[0]}; they must have the same size")
            if not mask.any():
                raise InputError("mask is all black: nothing to repaint (white = repaint)")
            px = image_pixels(image, ctx.height, ctx.width, "inpaint image").to(ctx.device, ctx.dtype)
            pixels.append(px)
            sources.append(ctx.encode_mean(px))
            m = torch.from_numpy(mask.astype(np.float32))[None, None].to(ctx.device, ctx.dtype)
            latent_masks.append(latent_cells(mask, ctx))
            pastes.append(feathered(m, float(self.feather)))
            repaint.append(m)
        self._pixels, self._source = torch.cat(pixels), torch.cat(sources)  # 1 or n of each
        self._latent_mask, self._paste = torch.cat(latent_masks), torch.cat(pastes)
        self._channels = self.unet_channels(ctx, torch.cat(repaint), torch.cat(pixels))

    def unet_channels(self, ctx: Context, repaint: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor | None:
        """What an inpainting UNet is told of the kept image besides the latents (None for a plain UNet): SD
        inpainting's mask and masked-image latents. `repaint`: 1 x 1 x H x W per source, 1 = repaint."""
        if int(ctx.network.config.in_channels) != 2 * ctx.latent_shape[1] + 1:
            return None
        return inpainting_channels(repaint, ctx.encode_mean(pixels * (1 - repaint)))

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> ModelInputs | None:
        if self._channels is None:
            return None
        return ModelInputs(extra_channels=self._channels.expand(latents.shape[0], -1, -1, -1))

    def after_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        if not self.blend:
            return latents
        n = latents.shape[0]
        source = self._source.expand(n, -1, -1, -1)
        if step.index + 1 < len(ctx.timesteps):
            t_next = ctx.timesteps[step.index + 1]
            known = ctx.scheduler.add_noise(source, ctx.noise(latents.shape), t_next.repeat(n))
        else:
            known = source
        return self._latent_mask * latents + (1 - self._latent_mask) * known

    def decoded(self, ctx: Context, images: torch.Tensor) -> torch.Tensor:
        if not self.paste:
            return images
        w = self._paste.to(images)
        return self._pixels.to(images) * (1 - w) + images * w


UNET_CHOICES = ("auto", "inpainting", "base")


def inpainting_channels(mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """The extra input of an inpainting UNet, Stable Diffusion inpainting's: the pixel mask (n x 1 x H x W, 1 =
    repaint) resized to the latents (nearest, as diffusers does) and the latents of the image with the mask
    blanked (n x C x h x w): n x (1 + C) x h x w. The trainer's `inpaint` recipe builds the same."""
    small = F.interpolate(mask.to(masked_latents.dtype), size=tuple(masked_latents.shape[-2:]))
    return torch.cat([small, masked_latents], dim=1)


def latent_cells(mask: np.ndarray, ctx: Context) -> torch.Tensor:
    """1 x 1 x h x w, 1 on the latent cells that any true pixel of the HxW bool mask touches (area-pooled > 0):
    what blended inpainting repaints and where confined guidance may act."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(m, size=tuple(ctx.latent_shape[-2:]), mode="area") > 0).to(ctx.device, ctx.dtype)


def feathered(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Paste-back weight: 0 outside the mask, ramping to 1 inside over ~radius pixels (mask 1 x 1 x H x W)."""
    if radius <= 0:
        return mask
    import kornia

    sigma = radius / 2
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = kornia.filters.gaussian_blur2d(mask, (size, size), (sigma, sigma), border_type="replicate")
    return mask * (2 * blurred - 1).clamp(0, 1)
