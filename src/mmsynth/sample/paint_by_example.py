"""Paint-by-Example (Yang et al. 2023): paint an exemplar object into a masked region of a scene.

An inpainting UNet that reads no text: its context is ONE token, the exemplar's CLIP class token through the
exemplar encoder (models/exemplar_encoder.py), and in the unconditional branch of classifier-free guidance the
encoder's learned unconditional token. Its input is the latents, the masked scene's latents and the KEEP mask
(1 = keep; diffusers' Paint-by-Example order and convention, the inverse of SD inpainting's), so a UNet trained by
diffusers' or the paper's code runs unchanged.

The control is blended inpainting with that UNet (`BlendedInpaint`: mask, feather, paste-back, RePaint resampling),
with the exemplar's context added. The paper samples without latent blending (`blend` False, its default here) and
diffusers does not paste the kept pixels back (`paste` True here keeps them bit for bit, as mmsynth's inpainting
does; set it False for diffusers' output).
The bundle carries the two networks as components: `paint_by_example_unet` and `paint_by_example_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.errors import InputError
from mmsynth.sample.controls import Branch, ModelInputs, Step, check_batch_length, decode_array, register_control
from mmsynth.sample.img2img import _as_rgb
from mmsynth.sample.inpaint import BlendedInpaint

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

PBE_UNET = "paint_by_example_unet"
PBE_ENCODER = "paint_by_example_encoder"
HOW = "train them with `mmsynth train paint-by-example`, or point --model at a bundle that has them"


@register_control
@dataclass(kw_only=True)
class PaintByExample(BlendedInpaint):
    """image: the scene (HxWx3); mask: HxW binary, white = where the exemplar goes; exemplar: the object's image (any
    size: the encoder resizes it). unet / encoder: the bundle's component names. image, mask and exemplar may be
    lists of n (image i of the batch paints exemplar i into scene i)."""

    name: ClassVar[str] = "paint-by-example"
    per_image: ClassVar[tuple[str, ...]] = ("image", "mask", "exemplar")

    exemplar: Any = None
    unet: str = PBE_UNET
    encoder: str = PBE_ENCODER
    blend: bool = False

    def _check_unet(self) -> None:
        for field in ("unet", "encoder"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise InputError(f"paint-by-example: {field} must be a component name, got {getattr(self, field)!r}")
        if self.exemplar is None or (isinstance(self.exemplar, list) and not self.exemplar):
            raise InputError("paint-by-example needs an exemplar image (--exemplar): the object to paint in")
        exemplars = self.exemplar if isinstance(self.exemplar, list) else [self.exemplar]
        decoded = [_as_rgb(np.asarray(decode_array(x, "exemplar"))) if isinstance(x, (np.ndarray, torch.Tensor))
                   else x for x in exemplars]  # fmt: skip
        self.exemplar = decoded if isinstance(self.exemplar, list) else decoded[0]

    def unet_name(self, bundle: Any) -> str | None:
        extras = getattr(bundle, "extras", {})
        missing = [name for name in (self.unet, self.encoder) if name not in extras]  # (asks without loading)
        if missing:
            raise InputError(f"paint-by-example: this model has no {' or '.join(missing)} component; {HOW}")
        return self.unet

    def unet_channels(self, ctx: Context, repaint: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Paint-by-Example's extra input: the masked scene's latents, then the keep mask at latent size (nearest)."""
        expected = 2 * ctx.latent_shape[1] + 1
        if int(ctx.network.config.in_channels) != expected:
            raise InputError(f"paint-by-example: component '{self.unet}' takes {ctx.network.config.in_channels} input "
                             f"channels, not the {expected} of an inpainting UNet")
        keep = 1 - repaint
        masked = ctx.encode_mean(pixels * keep)
        return torch.cat([masked, F.interpolate(keep.to(masked.dtype), size=tuple(masked.shape[-2:]))], dim=1)

    def prepare(self, ctx: Context) -> None:
        given = [p for p in (*ctx.request.prompts(), *ctx.request.negative_prompts()) if p]
        if given:
            raise InputError(f"paint-by-example conditions on the exemplar alone and reads no text; leave the prompt "
                             f"and negative prompt empty (got '{given[0]}')")
        super().prepare(ctx)
        check_batch_length(self.exemplar, ctx.request.n, "paint-by-example", "exemplars")
        encoder = ctx.bundle.extras[self.encoder]
        exemplars = self.exemplar if isinstance(self.exemplar, list) else [self.exemplar]
        arrays = [_as_rgb(np.asarray(decode_array(x, "exemplar"))) for x in exemplars]
        pixels = encoder.processor()(images=arrays, return_tensors="pt").pixel_values
        param = next(encoder.parameters())
        with torch.no_grad():
            tokens = encoder(pixels.to(param.device, param.dtype)).to(ctx.dtype)
        self._tokens = tokens  # 1 or n x 1 x width
        self._uncond = encoder.uncond_vector.detach().to(ctx.dtype)

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        n = latents.shape[0]
        token = self._uncond if branch.name == "uncond" else self._tokens
        channels = super().inputs(ctx, step, branch, latents)
        return ModelInputs(extra_channels=None if channels is None else channels.extra_channels,
                           context=token.expand(n, -1, -1))

    def close(self, ctx: Context) -> None:
        super().close(ctx)
        self.__dict__.pop("_tokens", None)
        self.__dict__.pop("_uncond", None)
