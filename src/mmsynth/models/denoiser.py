"""The denoiser seam: the one object the sampling loop calls, whatever network is behind it.

k-diffusion's model wrappers are the example: the loop hands `denoiser(x, t, inputs)` the scaled latents, the
timestep and the merged, batched model inputs (`ModelInputs`), and gets the network's prediction back. What the loop
must not know lives here: which class the network is, how its input channels are laid out, what it predicts, the
latent space it works in and how latents become pixels. A diffusers `UNet2DConditionModel` with a VAE is
`UNetDenoiser`; a pixel-space network, a UNet with another input layout or a model with its own conditioning
(Diff-AE's semantic code) is another `Denoiser` subclass and plugs into the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mmsynth.errors import InputError


@dataclass
class ModelInputs:
    """What the controls add to one model call. Every tensor has the batch first.

    Kinds and how several controls merge (sample/controls.merge_inputs merges; a control never sees the others):
    residuals (`down_residuals`, `mid_residual`, `down_intrablock_residuals`): summed, each scaled by
        its control's schedule (per residual) and region mask; a branch without them gets zeros.
    `cross_attention_kwargs`, `added_cond_kwargs`: dicts merged key by key (a key given twice is an error).
    `extra_channels`: concatenated to the latent input along channels, in control order.
    `class_labels`: one entry per control; each goes through the network's own class embedding and the
        embeddings are summed (an addition to the timestep embedding, Composer's global conditions).
    `timestep_cond`: additions to the timestep-embedding condition, summed.
    `extra_context`: tokens appended to the text context, in control order (where each control's tokens sit is
        reported back in `Context.token_slices`).
    `context`: a context that replaces the text (at most one control per branch; Paint-by-Example's exemplar token).
    """

    down_residuals: list[torch.Tensor] | None = None
    mid_residual: torch.Tensor | None = None
    down_intrablock_residuals: list[torch.Tensor] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    added_cond_kwargs: dict[str, Any] | None = None
    extra_channels: torch.Tensor | None = None
    class_labels: list[torch.Tensor] | torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    extra_context: torch.Tensor | None = None
    context: torch.Tensor | None = None


class Denoiser:
    """`denoiser(x, t, inputs) -> prediction`, with the geometry and the pixel mapping of its latent space.

    Subclasses set `prediction_type`,
    `latent_channels`, `scale_factor` (pixels per latent cell; 1 in pixel space) and `sample_size` (the native
    latent side), implement `__call__`, and give `network` (the torch module attention patches and hooks go
    on) unless the denoiser is that module itself; `encode`/`decode` default to the identity (pixel space, [-1, 1]).
    `inputs.context` is the batched context (text, or what a control put in its place), None when nothing
    conditions on one.
    """

    prediction_type: str = "epsilon"
    latent_channels: int = 3
    scale_factor: int = 1
    sample_size: int = 32

    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        raise NotImplementedError

    @property
    def network(self) -> torch.nn.Module:
        """The module whose attention layers controls patch: the denoiser itself when it is a torch module."""
        return self  # type: ignore[return-value]

    @property
    def resolution(self) -> int:
        """The native image side in pixels."""
        return self.sample_size * self.scale_factor

    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Latents of images in [-1, 1]: a sample of the posterior with image i's generator, or its mean without
        generators (inversion and blending must not draw noise)."""
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents."""
        return latents


class UNetDenoiser(Denoiser):
    """A diffusers `UNet2DConditionModel` in the latent space of an `AutoencoderKL` (Stable Diffusion's layout)."""

    def __init__(self, unet: torch.nn.Module, vae: Any, prediction_type: str = "epsilon") -> None:
        self.unet = unet
        self.vae = vae
        self.prediction_type = prediction_type
        self.latent_channels = int(vae.config.latent_channels)
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as diffusers' pipelines compute it
        size = unet.config.sample_size
        self.sample_size = int(size if isinstance(size, int) else size[0])

    @property
    def network(self) -> torch.nn.Module:
        return self.unet

    _KWARGS: ClassVar[dict[str, str]] = {
        "down_residuals": "down_block_additional_residuals",
        "mid_residual": "mid_block_additional_residual",
        "down_intrablock_residuals": "down_intrablock_additional_residuals",
        "cross_attention_kwargs": "cross_attention_kwargs",
        "added_cond_kwargs": "added_cond_kwargs",
        "timestep_cond": "timestep_cond",
    }

    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        latent_channels = x.shape[1]
        if inputs.extra_channels is not None:
            x = torch.cat([x, inputs.extra_channels], dim=1)
        expected = int(self.unet.config.in_channels)
        if x.shape[1] != expected:
            given = x.shape[1] - latent_channels
            hint = (": an inpainting UNet, give a mask (--mask, the inpaint control)"
                    if expected == 2 * latent_channels + 1 else "")  # fmt: skip
            raise InputError(f"the model's UNet takes {expected} input channels; the latents give {latent_channels}"
                             f" and the controls {given}{hint}")
        if inputs.context is None:
            raise InputError("nothing gives this model's UNet its context: the model has no text encoder, and no "
                             "control (an exemplar, an image embedding) gives a context in its place")
        kwargs: dict[str, Any] = {"encoder_hidden_states": inputs.context}
        for ours, theirs in self._KWARGS.items():
            value = getattr(inputs, ours)
            if value is not None:
                kwargs[theirs] = value
        if "down_intrablock_additional_residuals" in kwargs:  # the UNet pops from this list: give it its own
            kwargs["down_intrablock_additional_residuals"] = list(kwargs["down_intrablock_additional_residuals"])
        labels = inputs.class_labels
        if isinstance(labels, list) and len(labels) > 1:
            return self._with_summed_class_embeddings(x, t, labels, kwargs)
        if labels is not None:
            kwargs["class_labels"] = labels[0] if isinstance(labels, list) else labels
        return self.unet(x, t, return_dict=False, **kwargs)[0]

    def _with_summed_class_embeddings(self, x: torch.Tensor, t: torch.Tensor, labels: list[torch.Tensor],
                                      kwargs: dict[str, Any]) -> torch.Tensor:
        """Several controls' class labels: each through the UNet's own class embedding, the embeddings summed (a
        sum of raw labels is only right for a linear embedding)."""
        unet = self.unet
        summed = sum(unet.get_class_embed(sample=x, class_labels=c) for c in labels)
        unet.get_class_embed = lambda sample, class_labels: summed  # this call only: the instance attribute goes
        try:
            return unet(x, t, return_dict=False, class_labels=labels[0], **kwargs)[0]
        finally:
            del unet.get_class_embed

    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Scaled VAE latents: posterior samples with image i's generator (diffusers' img2img), or the posterior
        mean without generators. The VAE may be kept in another dtype than the UNet."""
        vae = self.vae
        dtype = next(self.unet.parameters()).dtype
        pixels = pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)
        if generators is None:
            return (vae.config.scaling_factor * vae.encode(pixels).latent_dist.mode()).to(dtype)
        lat = [vae.encode(pixels[i: i + 1]).latent_dist.sample(generator=generators[i])
               for i in range(pixels.shape[0])]  # fmt: skip
        return (vae.config.scaling_factor * torch.cat(lat)).to(dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents (the inverse of the VAE's scaling factor, as SD does), back in the UNet's
        dtype (a bf16-trained recipe's frozen VAE, SD's fp32 VAE beside an fp16 UNet)."""
        vae = self.vae
        dtype = latents.dtype
        latents = (latents / vae.config.scaling_factor).to(vae.dtype)
        return vae.decode(latents, return_dict=False)[0].to(dtype)


def make_denoiser(network: Any, vae: Any, prediction_type: str) -> Denoiser:
    """The denoiser for a bundle's network: a `Denoiser` as it is (it knows its own space), a diffusers UNet with
    the bundle's VAE."""
    if isinstance(network, Denoiser):
        return network
    if vae is None:
        raise InputError(f"a {type(network).__name__} works in a VAE's latent space, and this model has no VAE; "
                         "give it one, or wrap the network in a mmsynth Denoiser that knows its space")
    return UNetDenoiser(network, vae, prediction_type)
