"""AutoencoderKL for the zoo: reconstruction (L1 and/or L2) plus a small KL term.

`edge_weight` > 0 weighs every pixel's reconstruction error by 1 + edge_weight * (its edge strength in the
target, from Sobel gradients, saturating at EDGE_SATURATION), normalised by the mean weight: small crosses
and stars, whose arms are a few pixels wide, otherwise come back as blobs that the judge reads as squares
(measured: `mmsynth bench components` reports the judge's pass rate on reconstructions).

At export the latent scaling factor is measured like Stable Diffusion's 0.18215: 1 / std of the
latents of training images, so the UNet sees latents of unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.data.torch_dataset import collate
from mmsynth.errors import InputError
from mmsynth.models.bundle import load_component, save_components
from mmsynth.models.zoo import ZOO_SPECS, build_vae
from mmsynth.train.recipe import Recipe
from mmsynth.viz import grid

RECONSTRUCTION = ("l1", "l2", "l1+l2")
EDGE_SATURATION = 0.5  # Sobel magnitude (images in [-1, 1]) at which a pixel counts as a full edge


@dataclass
class VaeOptions:
    zoo: str = "shapes-v1"
    init: str | None = None  # continue from a folder with vae/
    reconstruction: str = "l1+l2"
    kl_weight: float = 1e-6  # same meaning as in Stable Diffusion's autoencoder configs
    edge_weight: float = 0.0  # extra reconstruction weight on the target's edges (0: plain per-pixel mean)
    scale_examples: int = 1024  # images used to measure the latent scaling factor at export
    grid_examples: int = 8

    def validate(self) -> None:
        if self.zoo not in ZOO_SPECS:
            raise InputError(f"config key 'options.zoo' must be one of {', '.join(ZOO_SPECS)}, got '{self.zoo}'")
        if self.reconstruction not in RECONSTRUCTION:
            raise InputError(f"config key 'options.reconstruction' must be one of {', '.join(RECONSTRUCTION)}")
        if self.edge_weight < 0:
            raise InputError(f"config key 'options.edge_weight' must be >= 0, got {self.edge_weight}")
        if self.kl_weight < 0 or self.scale_examples <= 0:
            raise InputError("config keys 'options.kl_weight' must be >= 0 and 'options.scale_examples' > 0")


class Autoencode(torch.nn.Module):
    """encode -> sample -> decode in one forward, returning the posterior too.

    AutoencoderKL.forward drops the posterior that the KL term needs; calling encode/decode on the
    bare model instead would bypass the DDP wrapper (no gradient all-reduce across processes).
    """

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior


def edge_weights(x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (n x 1 x H x W) with mean 1 per image: 1 + edge_weight * edge strength."""
    if edge_weight == 0:
        return torch.ones_like(x[:, :1])
    import kornia

    magnitude = kornia.filters.spatial_gradient(x).pow(2).sum(2).sqrt().amax(1, keepdim=True)
    w = 1.0 + edge_weight * (magnitude / EDGE_SATURATION).clamp(0, 1)
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


class VaeRecipe(Recipe):
    name = "vae"
    Options = VaeOptions
    description = "AutoencoderKL (factor 4) with L1/L2 reconstruction + small KL; records the latent scaling factor"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 32, "lr": 1e-3, "warmup_steps": 100}

    def build(self) -> None:
        o = self.options
        vae = load_component(o.init, "vae") if o.init else build_vae(ZOO_SPECS[o.zoo])
        self.models = {"autoencoder": Autoencode(vae)}
        self.trainable = ("autoencoder",)

    def _vae(self) -> torch.nn.Module:
        wrapper = self.models["autoencoder"]
        return getattr(wrapper, "module", wrapper).vae

    @property
    def resolution(self) -> int:
        return int(self._vae().config.sample_size)

    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["pixel_values"]
        recon, posterior = self.models["autoencoder"](x)
        weight = edge_weights(x.float(), self.options.edge_weight)
        diff = recon.float() - x.float()
        rec = {"l1": (weight * diff.abs()).mean(), "l2": (weight * diff.pow(2)).mean()}
        parts = self.options.reconstruction.split("+")
        rec_loss = sum(rec[p] for p in parts)
        # SD's loss is sum-over-pixels NLL + kl_weight * KL (sum over latent); dividing both by the pixel
        # count gives per-pixel means, so kl_weight means the same as in SD's configs (1e-6)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + self.options.kl_weight * kl
        with torch.no_grad():
            mse = F.mse_loss(recon.float().clamp(-1, 1), x.float(), reduction="none").mean(dim=(1, 2, 3))
            psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()  # peak-to-peak 2 in [-1, 1]
        logs = {"l1": rec["l1"], "l2": rec["l2"], "kl": kl, "psnr": psnr}
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def _fixed_batch(self, n: int, start: int = 10_000_000) -> torch.Tensor:
        """Examples far from the training indices, the same at every call (for grids and scaling)."""
        dataset = self.dataset()
        return collate([dataset[start + i] for i in range(n)])["pixel_values"].to(self.device)

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Top row: originals; bottom row: reconstructions (posterior mode)."""
        vae = self._vae()
        x = self._fixed_batch(self.options.grid_examples)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)

        def to_u8(t: torch.Tensor) -> list[np.ndarray]:
            return [((im.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8) for im in t]

        return grid(to_u8(x) + to_u8(recon), cols=len(x))

    @torch.no_grad()
    def latent_scaling_factor(self) -> float:
        """1 / std of sampled latents over `scale_examples` images (SD's recipe for 0.18215)."""
        vae = self._vae()
        latents = []
        for first in range(0, self.options.scale_examples, 64):
            n = min(64, self.options.scale_examples - first)
            x = self._fixed_batch(n, start=20_000_000 + first)
            latents.append(vae.encode(x.to(vae.dtype)).latent_dist.sample().float())
        return float(1.0 / torch.cat(latents).std())

    def export(self, out: Path) -> Path:
        vae = self._vae()
        was_training = vae.training
        vae.eval()
        vae.register_to_config(scaling_factor=self.latent_scaling_factor())
        vae.train(was_training)
        return save_components(out, vae=vae)
