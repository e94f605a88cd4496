"""Paint-by-Example's exemplar encoder (Yang et al. 2023): an image becomes ONE context token.

The exemplar goes through a CLIP vision tower; only its pooled class token is kept (the information bottleneck that
keeps the model from copy-pasting the exemplar), passed through a small transformer mapper, normalised and projected
to the UNet's context width. That single token replaces the text in cross-attention. A learned unconditional token
(`uncond_vector`) stands in for it in classifier-free guidance, as the paper trains it (20% of the steps).

diffusers ships the same network only inside its deprecated Paint-by-Example pipeline, on which mmsynth's own paths
must not depend; this class keeps its layout and parameter names, so weights move between the two unchanged (the
tests load ours into diffusers' `PaintByExampleImageEncoder` and compare the pipelines). It is a transformers
`CLIPPreTrainedModel`: `save_pretrained` / `from_pretrained` as for any CLIP tower; its config is the vision tower's
(`projection_dim` is the token's width) plus, for an encoder mmsynth made, how its exemplars were prepared.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn
from transformers import CLIPPreTrainedModel, CLIPVisionConfig, CLIPVisionModel

# the zoo's CLIPs see images in [-1, 1]: mean 0.5 and std 0.5 on [0, 1] pixels
ZOO_PIXEL_MEAN = (0.5, 0.5, 0.5)
ZOO_PIXEL_STD = (0.5, 0.5, 0.5)


class ExemplarMapper(nn.Module):
    """One transformer block per five vision layers (as diffusers counts them), single-head, over the class token."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(width, 1, width, activation_fn="gelu", attention_bias=True)
            for _ in range((config.num_hidden_layers + 1) // 5))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class ExemplarEncoder(CLIPPreTrainedModel):
    """pixel_values (n x 3 x S x S, normalised as `processor()` does) -> n x 1 x projection_dim context tokens."""

    config_class = CLIPVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        width = int(config.projection_dim)
        self.model = CLIPVisionModel(config)
        self.mapper = ExemplarMapper(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)
        self.proj_out = nn.Linear(config.hidden_size, width)
        self.uncond_vector = nn.Parameter(torch.randn((1, 1, width)))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model(pixel_values=pixel_values).pooler_output
        return self.proj_out(self.final_layer_norm(self.mapper(pooled[:, None])))

    def processor(self) -> Any:
        """The CLIPImageProcessor that prepares exemplars for this encoder. An encoder mmsynth made records how it was
        trained in its config (`squash`: the whole crop resized to a square, as the recipe feeds it; the zoo's mean
        and std); one that records nothing (diffusers' or the paper's weights) gets CLIP's own preprocessing: the
        shortest side resized, the centre cropped, OpenAI CLIP's mean and std."""
        from transformers import CLIPImageProcessor

        size, config = int(self.config.image_size), self.config
        kwargs: dict[str, Any] = {"crop_size": {"height": size, "width": size}}
        if getattr(config, "squash", False):
            kwargs.update(size={"height": size, "width": size}, do_center_crop=False)
        else:
            kwargs.update(size={"shortest_edge": size})
        for key in ("image_mean", "image_std"):
            if getattr(config, key, None) is not None:
                kwargs[key] = list(getattr(config, key))
        return CLIPImageProcessor(**kwargs)


def exemplar_encoder_from_clip(clip: Any, width: int) -> ExemplarEncoder:
    """An encoder whose vision tower starts from `clip`'s (the zoo's CLIPModel), projecting to `width` (the UNet's
    cross-attention width); mapper, norm, projection and unconditional token are fresh."""
    config = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": width, "squash": True,
                                 "image_mean": list(ZOO_PIXEL_MEAN), "image_std": list(ZOO_PIXEL_STD)})
    encoder = ExemplarEncoder(config)
    target = getattr(encoder.model, "vision_model", encoder.model)  # transformers 5 flattened CLIPVisionModel
    target.load_state_dict(clip.vision_model.state_dict())
    return encoder
