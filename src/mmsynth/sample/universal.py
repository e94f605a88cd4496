"""Universal guidance (Bansal et al. 2023) as one control of the one sampler.

Any differentiable loss on the decoded image (a guide, guides.py) steers sampling without training:

- forward guidance   eps_hat = eps + s0 * sqrt(1 - abar_t) * grad_z loss(guide(decode(x0_hat(z)))),
  where x0_hat comes from the loop's CFG-combined prediction WITH every other active control's inputs
  (ctx.predict) and is decoded through the VAE with gradients, so the gradient flows through the UNet
  and the decoder and guidance composes with img2img, inpainting and any later control;
- backward guidance  m gradient steps (Adam, `lr`) on a correction Delta to x0_hat (through the decoder
  only), mapped back into the noise prediction as eps_tilde = eps_hat - sqrt(abar_t / (1 - abar_t)) * Delta;
- self-recurrence    k passes per step: the loop re-noises z_{t-1} back to t
  (z_t = sqrt(abar_t / abar_{t-1}) z_{t-1} + sqrt(1 - abar_t / abar_{t-1}) noise) and rewinds the
  scheduler by snapshot/restore, so DDIM and the multistep solvers (DPM-Solver++, UniPC) both work.

Hooks used: `wants_gradient` (the loop then computes its guided prediction with gradients), `after` (the eps
terms, differentiating that very prediction) and `repeats` (k). The cost per guided step is one UNet backward
and a decoder forward + backward on top of plain sampling (plus m decoder passes for backward guidance),
times k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mmsynth.errors import InputError
from mmsynth.sample.controls import (
    MAX_PASSES,
    Control,
    Step,
    check_batch_length,
    decode_value,
    encode_value,
    is_integer,
    is_number,
    register_control,
)
from mmsynth.sample.guides import PerImageGuides, build_guide, check_guide_name, guide_loss

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

_PYTHON_GUIDE = "python:"


@register_control
@dataclass(kw_only=True)
class UniversalGuidance(Control):
    """guide: a shipped guide's name (guides.GUIDES) with `params`, or any nn.Module / callable from Python;
    a list of names with a list of params guides image i of the batch by guide i (JSON-replayable per image).

    s0 >= 0: forward guidance strength (0 = off); m >= 0: backward steps (0 = off), `lr` their Adam step;
    k >= 1: passes per step (self-recurrence). The schedule's start/end limit the steps it acts on.
    mask: confine guidance to a region (an edit that must leave the rest alone): latents outside it (area-pooled
    to the latent grid, a cell counts if any pixel of it is white) get neither the forward gradient nor the backward
    correction; an HxW binary image, or a list of them, one per image.
    """

    name: ClassVar[str] = "universal-guidance"
    per_image: ClassVar[tuple[str, ...]] = ("guide", "params", "mask")
    guide: Any = None
    params: Any = field(default_factory=dict)
    s0: float = 1.0
    k: int = 1
    m: int = 0
    lr: float = 0.05
    mask: Any = None

    def __post_init__(self) -> None:
        if not is_number(self.s0) or self.s0 < 0:
            raise InputError(f"s0 (forward guidance strength) must be a number >= 0, got {self.s0!r}")
        if not is_integer(self.k) or not 1 <= self.k <= MAX_PASSES:
            raise InputError(f"k (self-recurrence passes per step) must be an integer in [1, {MAX_PASSES}], got "
                             f"{self.k!r}")
        if not is_integer(self.m) or not 0 <= self.m <= MAX_PASSES:
            raise InputError(f"m (backward guidance steps) must be an integer in [0, {MAX_PASSES}], got {self.m!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise InputError(f"lr (backward guidance step size) must be a number > 0, got {self.lr!r}")
        if isinstance(self.guide, list):  # one shipped guide per image
            if not self.guide or not isinstance(self.params, list) or len(self.params) != len(self.guide):
                raise InputError("a list of guides (one per image) needs a list of as many params objects")
            for name in self.guide:
                self._check_name(name)
        elif self.guide is None:
            raise InputError("universal guidance needs a guide: a shipped name or an nn.Module from Python")
        elif isinstance(self.guide, str):
            self._check_name(self.guide)
        elif not callable(self.guide):
            raise InputError("guide must be a shipped guide's name or a callable module, "
                             f"got {type(self.guide).__name__}")
        if isinstance(self.params, list) and not isinstance(self.guide, list):
            raise InputError("params is a list (one per image) but guide is not: give a list of as many guide names")
        params = self.params if isinstance(self.params, list) else [self.params]
        for p in params:
            if not isinstance(p, dict):
                raise InputError(f"params (the guide's parameters) must be an object, got {type(p).__name__}")
        decoded = [{k: decode_value(v) for k, v in p.items()} for p in params]
        self.params = decoded if isinstance(self.params, list) else decoded[0]
        if self.mask is not None:
            from mmsynth.sample.inpaint import binary_mask

            masks = self.mask if isinstance(self.mask, list) else [self.mask]
            if not masks:
                raise InputError("guidance mask: give an image, or a list of one per image")
            masks = [binary_mask(m, "guidance mask").astype(np.uint8) * 255 for m in masks]
            if not all(m.any() for m in masks):
                raise InputError("guidance mask is all black: guidance could change nothing (white = may change)")
            self.mask = masks if isinstance(self.mask, list) else masks[0]

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith(_PYTHON_GUIDE):
            raise InputError(f"guide {name!r} was a Python module when this request was made; it cannot be "
                             "rebuilt from JSON: pass the module again from Python")
        check_guide_name(name)

    # ---- hooks
    def prepare(self, ctx: Context) -> None:
        if isinstance(self.guide, list):
            check_batch_length(self.guide, ctx.request.n, "universal guidance", "guides")
            self._guide = PerImageGuides([build_guide(g, p, ctx.bundle) for g, p in zip(self.guide, self.params)])
        else:
            self._guide = (build_guide(self.guide, self.params, ctx.bundle) if isinstance(self.guide, str)
                           else self.guide)
        self._label = (f"guide {self.guide!r}" if isinstance(self.guide, (str, list))
                       else f"guide {type(self.guide).__name__}")
        self._region = None
        if self.mask is not None:
            from mmsynth.sample.inpaint import latent_cells

            check_batch_length(self.mask, ctx.request.n, "universal guidance", "masks")
            cells = []
            for m in self.mask if isinstance(self.mask, list) else [self.mask]:
                if m.shape != (ctx.height, ctx.width):
                    raise InputError(f"guidance mask is {m.shape[1]}x{m.shape[0]} but the images are "
                                     f"{ctx.width}x{ctx.height}; they must have the same size")
                cells.append(latent_cells(m > 0, ctx))
            self._region = torch.cat(cells)

    def _confined(self, x: torch.Tensor) -> torch.Tensor:
        """x with the latents outside the guidance mask zeroed (unchanged without a mask)."""
        return x if self._region is None else x * self._region.to(x)

    def repeats(self, ctx: Context, step: Step) -> int:
        return self.k

    def recurrence(self) -> int:
        return self.k

    def wants_gradient(self, ctx: Context, step: Step) -> bool:
        return self.s0 > 0

    def after(self, ctx: Context, step: Step, latents: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        pt = ctx.prediction_type
        if self.s0 > 0:
            if out.requires_grad and latents.requires_grad:  # the loop's own prediction, differentiable
                grad = self.gradient_of(ctx, step, latents, out)
            else:
                grad = self.forward_gradient(ctx, step, latents.detach())
            latents, out = latents.detach(), out.detach()
            eps = step.to_eps(latents, out, pt) + self.s0 * math.sqrt(1.0 - step.alpha_bar) * self._confined(grad)
        else:
            eps = step.to_eps(latents, out, pt)
        if self.m > 0:
            a = step.alpha_bar
            x0 = (latents * step.input_scale - math.sqrt(1 - a) * eps) / math.sqrt(a)
            eps = eps - math.sqrt(a / (1 - a)) * self._confined(self.backward_delta(ctx, x0))
        return step.from_eps(latents, eps, pt)

    # ---- the two guidance terms
    def forward_gradient(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """grad of the guide's loss w.r.t. the variance-preserving latent, through the guided UNet and the decoder."""
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            return self.gradient_of(ctx, step, z, ctx.predict(z, step, controls=ctx.active(step)))

    def gradient_of(self, ctx: Context, step: Step, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The guide's gradient w.r.t. z, given the guided prediction `out` computed from z with gradients."""
        with torch.enable_grad():
            x0 = step.to_x0(z, out, ctx.prediction_type)
            loss = guide_loss(self._guide, ctx.decode(x0), self._label)
            (grad,) = torch.autograd.grad(loss, z, retain_graph=False)
        return grad / step.input_scale  # d/dz_vp = d/dz / input_scale (1 except in sigma space)

    def backward_delta(self, ctx: Context, x0: torch.Tensor) -> torch.Tensor:
        """Delta minimising the guide's loss at decode(x0 + Delta), by m Adam steps (decoder gradients only)."""
        x0 = x0.detach()
        delta = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.m):
                opt.zero_grad()
                guide_loss(self._guide, ctx.decode(x0 + delta), self._label).backward(inputs=[delta])
                opt.step()
        return delta.detach()

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not isinstance(self.guide, (str, list)):
            d["guide"] = _PYTHON_GUIDE + type(self.guide).__name__
        params = self.params if isinstance(self.params, list) else [self.params]
        encoded = [{k: encode_value(v) for k, v in p.items()} for p in params]
        d["params"] = encoded if isinstance(self.params, list) else encoded[0]
        return d
