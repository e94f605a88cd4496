"""ControlNet (Zhang et al. 2023) as a control of the one sampler: residuals from a `ControlNetModel` added to the
UNet's skip connections at every active step.

Faithful to diffusers' `StableDiffusionControlNetPipeline` (tests check it to float32 tolerance): the condition
image is preprocessed as its `prepare_image` does; the ControlNet runs once per step, batched over the branches it
applies to, on the scaled latents with each branch's own text context; its residuals are scaled per residual by
`schedule.scale` (one number = diffusers' `controlnet_conditioning_scale`, or one per residual) and limited to
`schedule.start`/`end` with diffusers' `control_guidance_start`/`end` rule. Several ControlNets are several controls:
their residuals are summed, as diffusers' `MultiControlNetModel` sums them.

Guess mode (diffusers' and the reference's): the control acts on the conditional branch only, and residual i of N is
scaled by `logspace(-1, 0, N)[i]` (0.1 at the shallowest, 1.0 at the middle block; diffusers' ControlNetModel applies
it). The A1111 extension's control modes, which diffusers does not have: "balanced" (as diffusers), "prompt" ("my
prompt is more important": residual i of N scaled by 0.825 ** (N - 1 - i) on both branches), "control" ("ControlNet
is more important": the control on the conditional branch only, no re-weighting). The weights multiply: residual i
gets schedule.scale_i * mode_i * guess_i. A region mask (`schedule.mask`) multiplies every residual (the loop does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.models.denoiser import ModelInputs
from mmsynth.sample.controls import Branch, Step, register_control
from mmsynth.sample.spatial import SpatialControl, cond_only

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

MODES = ("balanced", "prompt", "control")
PROMPT_MODE_DECAY = 0.825  # the A1111 extension's "my prompt is more important": 0.825 ** (N - 1 - i)


def mode_weights(mode: str, count: int) -> list[float] | None:
    """The per-residual weights of a control mode (None: all 1)."""
    if mode == "prompt":
        return [PROMPT_MODE_DECAY ** float(count - 1 - i) for i in range(count)]
    return None


@register_control
@dataclass(kw_only=True)
class ControlNet(SpatialControl):
    """model: a `ControlNetModel` component of the bundle (e.g. "controlnet_canny") or a directory; image: the
    condition (or a list of n); annotate: extract it from `image` first (e.g. "canny"); guess_mode: the reference's
    prompt-free mode (conditional branch only, residuals scaled 0.1 -> 1.0); mode: "balanced" | "prompt" | "control"
    (the A1111 extension's control modes). schedule.scale is the conditioning scale (one, or one per residual)."""

    name: ClassVar[str] = "controlnet"
    model_class: ClassVar[str] = "ControlNetModel"

    guess_mode: bool = False
    mode: str = "balanced"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.guess_mode, bool):
            raise InputError(f"controlnet: guess_mode must be true or false, got {self.guess_mode!r}")
        if self.mode not in MODES:
            raise InputError(f"controlnet: unknown mode {self.mode!r}; valid: {', '.join(MODES)} (balanced; prompt = "
                             "my prompt is more important; control = ControlNet is more important)")
        if self.guess_mode:
            self.schedule = cond_only(self.schedule, self.name, "guess mode")
        elif self.mode == "control":
            self.schedule = cond_only(self.schedule, self.name, "mode 'control'")

    def prepare(self, ctx: Context) -> None:
        net = self.network(ctx)
        check_base(net, ctx, self.model)
        if net.config.global_pool_conditions and not self.guess_mode:
            raise InputError(f"controlnet: model '{self.model}' pools its condition (global_pool_conditions), which "
                             "diffusers runs in guess mode only; set guess_mode true")
        cond = self.condition(ctx, int(net.config.conditioning_channels))
        self._net = net
        self._cond = cond.expand(ctx.request.n, -1, -1, -1) if cond.shape[0] == 1 else cond

    def branch_inputs(self, ctx: Context, step: Step, branches: list[Branch],
                      latents: torch.Tensor) -> list[ModelInputs | None]:
        contexts = [b.context for b in branches]
        if any(c is None for c in contexts):
            raise InputError("controlnet: a ControlNet reads the branch's text context, and this run has none")
        if len({tuple(c.shape) for c in contexts}) > 1:  # contexts that cannot share a batch: one call each
            return [self._run(step, [b], latents)[0] for b in branches]
        return self._run(step, branches, latents)

    def _run(self, step: Step, branches: list[Branch], latents: torch.Tensor) -> list[ModelInputs | None]:
        """The ControlNet once for `branches` (batched), its residuals weighted by mode and split per branch."""
        k, n = len(branches), latents.shape[0]

        def batched(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(xs) if k > 1 else xs[0]

        extra: dict[str, Any] = {}
        if branches[0].added_cond is not None:  # SDXL: the ControlNet reads pooled text and time ids as the UNet does
            extra["added_cond_kwargs"] = {key: batched([b.added_cond[key] for b in branches])
                                          for key in branches[0].added_cond}
        down, mid = self._net(batched([latents] * k), step.t,
                              encoder_hidden_states=batched([b.context for b in branches]),
                              controlnet_cond=batched([self._cond] * k), conditioning_scale=1.0,
                              guess_mode=self.guess_mode, return_dict=False, **extra)
        weights = mode_weights(self.mode, len(down) + 1)
        if weights is not None:
            down = [d * w for d, w in zip(down, weights)]
            mid = mid * weights[-1]
        return [ModelInputs(down_residuals=[d[i * n:(i + 1) * n] for d in down], mid_residual=mid[i * n:(i + 1) * n])
                for i in range(k)]

    def close(self, ctx: Context) -> None:
        self.__dict__.pop("_net", None)
        self.__dict__.pop("_cond", None)


def check_base(net: Any, ctx: Context, model: str) -> None:
    """The ControlNet fits the UNet this run calls and its latent space: same widths, depth, text width, latent
    channels, and a condition encoder that downsamples by the VAE's factor; else say plainly it is for another base."""
    unet_config = getattr(ctx.network, "config", None)
    if unet_config is None or not hasattr(unet_config, "block_out_channels"):
        raise InputError(f"controlnet: this model's network is a {type(ctx.network).__name__}, not a diffusers UNet; "
                         "a ControlNet adds residuals to a UNet's skip connections")
    cfg = net.config
    factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    checks = [
        ("block_out_channels", tuple(cfg.block_out_channels), tuple(unet_config.block_out_channels)),
        ("layers_per_block", cfg.layers_per_block, unet_config.layers_per_block),
        ("cross_attention_dim", cfg.cross_attention_dim, unet_config.cross_attention_dim),
        ("in_channels (latent channels)", cfg.in_channels, ctx.latent_shape[1]),
        ("condition downsampling (VAE factor)", factor, ctx.denoiser.scale_factor),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise InputError(f"ControlNet '{model}' was built for another base ({what} {theirs}; this model's is "
                             f"{ours}); use a ControlNet made from this model's UNet")
