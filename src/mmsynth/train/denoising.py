"""The shared story of training a denoiser (Stable Diffusion's recipe), read top to bottom in `loss`:

    x0    = latents(batch)                    frozen-VAE latents (or a latent cache's posterior), scaled
    batch = drop_conditions(batch)            CFG's caption dropout; ControlNet's empty prompts, Composer's groups
    cond  = condition(batch)                  text hidden states, extra input channels, other UNet inputs
    noise ~ N(0, I), t = draw_timesteps(n)    uniform, or T2I-Adapter's cubic (class attribute timestep_sampling)
    x_t   = add_noise(x0, noise, t)
    pred  = predict(x_t, t, cond)             the network; `cond["channels"]` concatenated to its input
    loss  = weighted(MSE(pred, target(x0, noise, t)), t) + extra_loss(...)    epsilon or v target, min-SNR-gamma

A method subclasses `DenoisingRecipe`, builds its models (`build`, calling `set_scheduler`) and overrides only
the hooks where it differs: an inpainting UNet adds channels in `condition`, a ControlNet adds residuals in
`predict` and marks only itself trainable, T2I-Adapter sets `timestep_sampling = "cubic"`, Composer overrides
`drop_conditions`, an identity loss on the predicted x0 is an `extra_loss`. The trainer never learns which.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr
from torch.utils.data import Dataset

from mmsynth.errors import InputError
from mmsynth.models.tokenizer import tokenize_padded
from mmsynth.train.latent_cache import LatentCacheExamples
from mmsynth.train.recipe import Recipe

PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections a LoRA adapts (diffusers' SD LoRAs)


def add_lora(unet: torch.nn.Module, rank: int) -> None:
    """A LoRA of `rank` on every attention projection of `unet` (peft through diffusers' `add_adapter`)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))  # fmt: skip


def train_only(module: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    """Leave trainable only the LoRA matrices and the parameters under `prefixes` (layers trained in full)."""
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(prefixes))
TIMESTEP_SAMPLING = ("uniform", "cubic")


@dataclass
class DenoisingOptions:
    """The knobs every denoising recipe has (YAML key `options`); a method's Options subclass this."""

    prediction_type: str = "epsilon"
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (the CFG unconditional branch)

    def validate(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"config key 'options.prediction_type' must be one of {', '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise InputError(f"config key 'options.snr_gamma' must be > 0 or none, got {self.snr_gamma}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise InputError(f"config key 'options.caption_dropout' must be in [0, 1], got {self.caption_dropout}")


@dataclass
class DenoisingStep:
    """What one micro-batch's denoising pass computed, for `extra_loss`."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    cond: dict[str, Any]
    pred: torch.Tensor
    target: torch.Tensor
    per_sample: torch.Tensor  # each example's mean squared error
    recorded: Any = None  # what `recording()` yielded (e.g. attention maps)


class DenoisingRecipe(Recipe):
    """Base of every diffusion recipe. `build` fills `models` with at least "unet" and "vae" (and "text_encoder"
    with `self.tokenizer` when text conditions it), sets `trainable`, and calls `set_scheduler`."""

    Options = DenoisingOptions
    trains_on_latents = True
    timestep_sampling: ClassVar[str] = "uniform"  # or "cubic": T2I-Adapter's t = (1 - u^3) T, more high-noise draws

    tokenizer: Any = None
    scheduler: Any = None  # the sampling scheduler the export carries
    noise_scheduler: DDPMScheduler

    # ---------------------------------------------------------------- set-up helpers
    def set_scheduler(self, scheduler: Any) -> None:
        """Train on `scheduler`'s noise schedule with this run's prediction type (written into the export)."""
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise InputError(f"recipe '{self.name}': timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got '{self.timestep_sampling}'")  # fmt: skip
        o = self.options
        if scheduler.config.get("rescale_betas_zero_snr", False) and (o.prediction_type != "v_prediction"
                                                                      or o.snr_gamma is not None):
            raise InputError(f"recipe '{self.name}': the base's schedule reaches zero SNR, where an epsilon target "
                             "says nothing of the image and min-SNR weighting is 0/0: set options.prediction_type "
                             "v_prediction and options.snr_gamma none")  # fmt: skip
        scheduler.register_to_config(prediction_type=o.prediction_type)
        self.scheduler = scheduler
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)

    @property
    def resolution(self) -> int:
        vae, size = self.models["vae"], self.unwrapped("unet").config.sample_size
        return int(size if isinstance(size, int) else size[0]) * 2 ** (len(vae.config.block_out_channels) - 1)

    def dataset(self) -> Dataset:
        examples = super().dataset()
        if isinstance(examples, LatentCacheExamples):
            examples.check_vae(self.models["vae"], where=self.vae_origin())
        return examples

    def vae_origin(self) -> str:
        """Where the VAE came from, for errors (a subclass names its config key)."""
        return f"the VAE of recipe '{self.name}'"

    # ---------------------------------------------------------------- the hooks, in the order `loss` calls them
    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """A latent draw per example: encoded now from pixels, or from a latent cache's stored posterior."""
        vae = self.models["vae"]
        if "latent_params" in batch:
            params = batch["latent_params"].to(self.device, torch.float32)
        else:
            params = vae.encode(batch["pixel_values"].to(self.device, self.weight_dtype)).latent_dist.parameters
        latents = DiagonalGaussianDistribution(params.float()).sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def drop_conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with dropped conditions replaced by their null value, so the model also learns the branch
        classifier-free guidance subtracts. Default: a `caption_dropout` fraction of captions becomes ""."""
        keep = torch.rand(len(batch["caption"])) >= self.options.caption_dropout
        return {**batch, "caption": [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]}

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The network's conditioning: UNet keyword arguments, plus "channels" (concatenated to its input)."""
        return {"encoder_hidden_states": self.encode_text(list(batch["caption"]))}

    def draw_timesteps(self, n: int) -> torch.Tensor:
        steps = int(self.noise_scheduler.config.num_train_timesteps)
        if self.timestep_sampling == "cubic":
            u = torch.rand(n, device=self.device)
            return ((1.0 - u**3) * steps).long().clamp(0, steps - 1)
        return torch.randint(0, steps, (n,), device=self.device).long()

    def recording(self) -> AbstractContextManager[Any]:
        """A context around `predict` whose value reaches `extra_loss` (e.g. recorded attention maps)."""
        return nullcontext(None)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: v for k, v in cond.items() if k != "channels"}
        if "channels" in cond:
            noisy = torch.cat([noisy, cond["channels"].to(noisy)], dim=1)
        return self.models["unet"](noisy, timesteps, **kwargs).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.options.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weighted(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch mean of each example's error, min-SNR-gamma weighted (Hang et al. 2023) unless snr_gamma is
        None. diffusers' compute_snr gives the SNR; for v the weight is min(SNR, gamma) / (SNR + 1)."""
        if self.options.snr_gamma is None:
            return per_sample.mean()
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.options.snr_gamma)
        weight = clipped / (snr + 1) if self.options.prediction_type == "v_prediction" else clipped / snr
        return (per_sample * weight).mean()

    def extra_loss(self, step: DenoisingStep, batch: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A term added to the denoising loss (already weighted), and numbers to log; default none."""
        return None, {}

    # ---------------------------------------------------------------- the step
    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        latents = self.latents(batch)
        batch = self.drop_conditions(batch)
        cond = self.condition(batch)
        noise = torch.randn_like(latents)
        timesteps = self.draw_timesteps(latents.shape[0])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.recording() as recorded:
            pred = self.predict(noisy, timesteps, cond)
        target = self.target(latents, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        loss = denoising = self.weighted(per_sample, timesteps)
        extra, logs = self.extra_loss(
            DenoisingStep(latents, noise, timesteps, noisy, cond, pred, target, per_sample, recorded), batch
        )
        if extra is not None:
            loss = loss + extra
            logs = {**logs, "denoising": float(denoising.detach())}
        return loss, logs

    # ---------------------------------------------------------------- text
    def tokenize(self, captions: list[str], **extra: Any) -> Any:
        """The captions padded to the tokenizer's max length, as diffusers' pipelines tokenise prompts."""
        return tokenize_padded(self.tokenizer, captions, **extra)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states (with gradients only when it trains)."""
        ids = self.tokenize(captions, return_tensors="pt").input_ids.to(self.device)
        with torch.set_grad_enabled("text_encoder" in self.trainable and torch.is_grad_enabled()):
            return self.models["text_encoder"](ids)[0]
