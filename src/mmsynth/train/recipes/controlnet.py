"""ControlNet (Zhang et al. 2023): a trainable copy of the frozen UNet's encoder and middle block, fed a condition
map, whose zero-initialised outputs are added to the UNet's skip connections and middle block.

The paper's training setting: the base stays frozen, the ControlNet starts as `ControlNetModel.from_unet` (so at
step 0 the UNet predicts exactly what it did), and 50% of captions are emptied (`options.caption_dropout` 0.5) so
that the control learns the image's semantics from the map alone. The condition encoder downsamples by the VAE's
factor (`models.zoo.build_controlnet`: 4 for the zoo, STACK.md), so diffusers' StableDiffusionControlNetPipeline
runs the export `RUN/final/controlnet` unchanged; that pipeline also draws the progress grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

from mmsynth.models.bundle import Bundle
from mmsynth.models.zoo import build_controlnet
from mmsynth.train.recipes.control import ControlOptions, ControlRecipe


@dataclass
class ControlNetOptions(ControlOptions):
    caption_dropout: float = 0.5  # the paper: half the prompts empty, so the map alone must carry the image


class ControlNetRecipe(ControlRecipe):
    name = "controlnet"
    Options = ControlNetOptions
    control = "controlnet"
    description = "ControlNet on a frozen text-to-image bundle (one condition map, 50% empty prompts)"

    def fresh_control(self, base: Bundle) -> torch.nn.Module:
        return build_controlnet(base.unet, base.vae_scale_factor,
                                conditioning_channels=self.options.conditioning_channels)

    def load_control(self, path: str) -> torch.nn.Module:
        return ControlNetModel.from_pretrained(path)

    def network_channels(self, network: torch.nn.Module) -> int:
        return int(network.config.conditioning_channels)

    def residuals(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  image: torch.Tensor) -> dict[str, Any]:  # fmt: skip
        """The ControlNet on the same noisy latents, timesteps and text as the UNet: 12 + 1 residuals for SD."""
        down, mid = self.models[self.control](noisy, timesteps, encoder_hidden_states=context, controlnet_cond=image,
                                              return_dict=False)  # fmt: skip
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def pipeline(self) -> StableDiffusionControlNetPipeline:
        return StableDiffusionControlNetPipeline(**self.pipeline_parts(), controlnet=self.unwrapped(self.control))
