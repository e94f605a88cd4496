"""Composer's condition networks (Huang et al. 2023), adapted to a latent UNet.

Composer decomposes an image into representations and generates from any subset of them. Global ones (the caption's
pooled embedding, the CLIP image embedding, the CIELab colour histogram) are projected and added to the timestep
embedding; the image embedding and the colour also become extra context tokens beside the caption's words. Local
ones (sketch, segmentation, depth, intensity, the masked image with its mask) each pass through a small conv stack
to the latent grid; the embeddings are SUMMED and concatenated to the noisy input.

Composer itself is a pixel-space cascade; on a latent UNet (our adaptation) the concatenation widens the UNet's
input convolution with zero-initialised channels, and the global sum enters through diffusers' own class embedding
(`class_embed_type="projection"`, its last layer zero-initialised): at step 0 the UNet predicts what its base does
whatever the conditions. A dropped condition is its null: no term in the local sum, zeros in the global vector and
in its tokens. `ComposerConditioner` is a diffusers ModelMixin (save_pretrained / from_pretrained), a bundle
component of library "mmsynth".
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# The representations, by kind, with their channels (local maps, as annotate.network_input prepares them, [0, 1]) or
# default widths (global vectors; the caption's and the image's are the bundle's text and CLIP widths).
LOCAL_CONDITIONS: dict[str, int] = {"sketch": 1, "segmentation": 3, "depth": 1, "intensity": 1, "masked_image": 4}
GLOBAL_CONDITIONS: tuple[str, ...] = ("caption", "image", "histogram")
TOKEN_CONDITIONS: tuple[str, ...] = ("image", "histogram")  # also extra context tokens


class LocalEncoder(nn.Module):
    """A condition map (C x H x W) to the latent grid (out x H/f x W/f): conv, then stride-2 convs down to the VAE's
    factor, then a zero-initialised 1x1 projection (a new condition adds nothing until trained)."""

    def __init__(self, channels: int, out_channels: int, factor: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width // 2, 3, padding=1), nn.SiLU()]
        c, f = width // 2, factor
        while f > 1:
            layers += [nn.Conv2d(c, width, 3, padding=1, stride=2), nn.SiLU()]
            c, f = width, f // 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class ComposerConditioner(ModelMixin, ConfigMixin):
    """The representations a Composer UNet reads: `local_channels` (summed local embeddings, the UNet's extra input),
    `global_vector` (its class labels) and `tokens` (extra context)."""

    @register_to_config
    def __init__(self, local_conditions: dict[str, int] | None = None, global_conditions: dict[str, int] | None = None,
                 out_channels: int = 4, factor: int = 8, context_dim: int = 768, tokens_per_condition: int = 4,
                 width: int = 32) -> None:  # fmt: skip
        super().__init__()
        local_conditions = dict(local_conditions or LOCAL_CONDITIONS)
        global_conditions = dict(global_conditions or {})
        self.local = nn.ModuleDict({name: LocalEncoder(c, out_channels, factor, width)
                                    for name, c in local_conditions.items()})  # fmt: skip
        self.token_projections = nn.ModuleDict({
            name: nn.Linear(dim, tokens_per_condition * context_dim)
            for name, dim in global_conditions.items() if name in TOKEN_CONDITIONS})  # fmt: skip

    @property
    def global_dim(self) -> int:
        return int(sum(self.config.global_conditions.values()))

    def local_channels(self, maps: dict[str, torch.Tensor], batch: int, size: tuple[int, int]) -> torch.Tensor:
        """The sum of the given maps' embeddings (batch x out x h x w); zeros when none is given."""
        dtype = next(self.parameters()).dtype
        total = torch.zeros(batch, self.config.out_channels, *size, device=self.device, dtype=dtype)
        for name, value in maps.items():
            total = total + self.local[name](value.to(self.device, dtype))
        return total

    def global_vector(self, vectors: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """The global conditions side by side in config order (batch x global_dim), zeros for the dropped."""
        parts = []
        for name, dim in self.config.global_conditions.items():
            value = vectors.get(name)
            parts.append(torch.zeros(batch, dim, device=self.device, dtype=self.dtype) if value is None
                         else value.to(self.device, self.dtype).reshape(batch, dim))  # fmt: skip
        return torch.cat(parts, dim=1)

    def tokens(self, vectors: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Extra context tokens (batch x k x context_dim): tokens_per_condition per token condition, zeros for a
        dropped one (so the count, and the batch's shape, never changes)."""
        k, d = self.config.tokens_per_condition, self.config.context_dim
        out = []
        for name, projection in self.token_projections.items():
            value = vectors.get(name)
            out.append(torch.zeros(batch, k, d, device=self.device, dtype=self.dtype) if value is None
                       else projection(value.to(self.device, self.dtype)).reshape(batch, k, d))  # fmt: skip
        return torch.cat(out, dim=1) if out else torch.zeros(batch, 0, d, device=self.device, dtype=self.dtype)


def composer_unet(base: Any, extra_channels: int, global_dim: int) -> Any:
    """A copy of `base` (a diffusers UNet2DConditionModel) that also takes `extra_channels` input channels (zero
    weights) and adds a projection of a `global_dim` vector to its timestep embedding (last layer zero): at step 0
    it predicts exactly what the base predicts."""
    from diffusers import UNet2DConditionModel

    c = int(base.config.in_channels)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "in_channels": c + extra_channels,
                                             "class_embed_type": "projection",
                                             "projection_class_embeddings_input_dim": global_dim})  # fmt: skip
    state = dict(unet.state_dict())
    state.update({k: v for k, v in base.state_dict().items() if k != "conv_in.weight"})
    wide = torch.zeros_like(state["conv_in.weight"])
    wide[:, :c] = base.state_dict()["conv_in.weight"]
    state["conv_in.weight"] = wide
    for key in ("class_embedding.linear_2.weight", "class_embedding.linear_2.bias"):
        state[key] = torch.zeros_like(state[key])
    unet.load_state_dict(state)
    return unet
