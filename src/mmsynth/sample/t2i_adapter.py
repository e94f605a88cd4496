"""T2I-Adapter (Mou et al. 2023) as a control of the one sampler: a `T2IAdapter`'s multi-scale features added to
the UNet's encoder (`down_intrablock_additional_residuals`).

The features do not depend on the timestep or the text, so they are computed once, in `prepare`, and given to every
branch, as diffusers' `StableDiffusionAdapterPipeline` gives them to both classifier-free guidance branches. The
weight omega is `schedule.scale` (diffusers' `adapter_conditioning_scale`; one number, or one per feature scale).
Several adapters are several controls, summed with their weights: `F = sum_k w_k F_k`, diffusers' `MultiAdapter`
with `adapter_weights`. The reference's `cond_tau` (adapt only the first fraction of the steps) is `schedule.end`;
diffusers' adapter pipeline has no such option and equals start 0, end 1 (the default). A region mask
(`schedule.mask`) multiplies the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.models.denoiser import ModelInputs
from mmsynth.sample.controls import Step, register_control
from mmsynth.sample.spatial import SpatialControl

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context


@register_control
@dataclass(kw_only=True)
class T2IAdapterControl(SpatialControl):
    """model: a `T2IAdapter` component of the bundle (e.g. "adapter_depth") or a directory; image: the condition (or
    a list of n; grey for a 1-channel adapter, RGB for a 3-channel one: converted as needed); annotate: extract it
    from `image` first (e.g. "xdog"). schedule.scale is omega, schedule.end the reference's cond_tau."""

    name: ClassVar[str] = "t2i-adapter"
    model_class: ClassVar[str] = "T2IAdapter"

    def prepare(self, ctx: Context) -> None:
        net = self.network(ctx)
        check_adapter_base(net, ctx, self.model)
        features = net(self.condition(ctx, int(net.config.in_channels)))
        n = ctx.request.n
        self._features = [f.expand(n, -1, -1, -1) if f.shape[0] == 1 else f for f in features]

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> ModelInputs | None:
        return ModelInputs(down_intrablock_residuals=list(self._features))

    def close(self, ctx: Context) -> None:
        self.__dict__.pop("_features", None)


def check_adapter_base(net: Any, ctx: Context, model: str) -> None:
    """The adapter's features fit the UNet this run calls: one per down block, as wide as it, the first at latent
    resolution; and the UNet adds them (every down block but the last has cross-attention, SD's layout)."""
    unet_config = getattr(ctx.network, "config", None)
    if unet_config is None or not hasattr(unet_config, "down_block_types"):
        raise InputError(f"t2i-adapter: this model's network is a {type(ctx.network).__name__}, not a diffusers UNet")
    cfg = net.config
    checks = [("channels", tuple(cfg.channels), tuple(unet_config.block_out_channels)),
              ("downscale_factor (VAE factor)", cfg.downscale_factor, ctx.denoiser.scale_factor)]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise InputError(f"T2I-Adapter '{model}' was built for another base ({what} {theirs}; this model's is "
                             f"{ours}); use an adapter made for this model's UNet")
    blocks = unet_config.down_block_types
    if any("CrossAttn" not in b for b in blocks[:-1]):
        raise InputError(f"t2i-adapter: this model's UNet ({', '.join(blocks)}) cannot take adapter features: every "
                         "down block but the last needs cross-attention (Stable Diffusion's layout)")
