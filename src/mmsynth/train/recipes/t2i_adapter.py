"""T2I-Adapter (Mou et al. 2023): a small network (pixel-unshuffle, then residual blocks at each UNet scale)
whose features are added to the frozen UNet's encoder features.

The paper's training setting: the base stays frozen and timesteps are drawn cubically, t = (1 - u^3) T, more of
them at high noise where an image's structure is decided (`timestep_sampling = "cubic"`); captions drop out as
t2i's do, for classifier-free guidance. The adapter is timestep-independent. `models.zoo.build_adapter` unshuffles
by the VAE's factor (4 for the zoo, STACK.md), so diffusers' StableDiffusionAdapterPipeline runs the export
`RUN/final/adapter` unchanged; that pipeline also draws the progress grid. A full adapter needs cross-attention in
every down block of the UNet but the last (the zoo's models/shapes-v1 has it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle
from mmsynth.models.zoo import build_adapter
from mmsynth.train.recipes.control import ControlOptions, ControlRecipe


@dataclass
class AdapterOptions(ControlOptions):
    num_res_blocks: int = 2  # residual blocks per scale of a fresh adapter (the reference's full adapter: 2)

    def validate(self) -> None:
        super().validate()
        if self.num_res_blocks < 1:
            raise InputError(f"config key 'options.num_res_blocks' must be >= 1, got {self.num_res_blocks}")


class AdapterRecipe(ControlRecipe):
    name = "t2i-adapter"
    Options = AdapterOptions
    control = "adapter"
    timestep_sampling: ClassVar[str] = "cubic"
    description = "T2I-Adapter on a frozen text-to-image bundle (one condition map, cubic timestep sampling)"

    def fresh_control(self, base: Bundle) -> torch.nn.Module:
        o = self.options
        try:
            return build_adapter(base.unet, base.vae_scale_factor, in_channels=o.conditioning_channels,
                                 num_res_blocks=o.num_res_blocks)  # fmt: skip
        except ValueError as exc:
            raise InputError(f"options.base ('{o.base}'): {exc}") from None

    def load_control(self, path: str) -> torch.nn.Module:
        return T2IAdapter.from_pretrained(path)

    def network_channels(self, network: torch.nn.Module) -> int:
        return int(network.config.in_channels)

    def residuals(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  image: torch.Tensor) -> dict[str, Any]:  # fmt: skip
        """The adapter's features, one per down block, as a fresh list: the UNet pops from it as it goes."""
        return {"down_intrablock_additional_residuals": list(self.models[self.control](image))}

    def pipeline(self) -> StableDiffusionAdapterPipeline:
        return StableDiffusionAdapterPipeline(**self.pipeline_parts(), adapter=self.unwrapped(self.control))
