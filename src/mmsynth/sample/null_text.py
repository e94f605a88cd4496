"""Null-text inversion (Mokady et al. 2023): an exact starting point for edits sampled at cfg > 1.

DDIM inversion under the source caption gives a trajectory z*_0 -> z*_T that sampling at cfg 1 retraces, but
an edit samples at cfg > 1, which drifts off it (the source is not reconstructed, so neither is what the edit
should keep). Null-text inversion keeps x_T = z*_T and replaces the unconditional ("null-text") embedding,
step by step, by one optimised so that the cfg-guided DDIM step from the current latent lands on the next
pivot z*_{t-1}. Sampling the source caption with those embeddings then rebuilds the image; sampling an edited
caption with them edits it (usually together with prompt-to-prompt's attention replay).

It runs in the one loop, three times: the DDIM inversion (`invert`, a recorder control keeping every latent),
the tuning pass (a control whose `before` hook optimises the embedding through the loop's differentiable
`predict` and whose `inputs` hook feeds it to the unconditional branch), and the edit itself (the same
`inputs` hook, replaying the embedding of each step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.sample.controls import Branch, Control, ModelInputs, Predict, Step, is_integer, is_number, register_control
from mmsynth.sample.inversion import InvertedLatents, invert

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

TOLERANCE = 1e-5  # the paper's early stop: step i stops optimising once the loss is below TOLERANCE * (1 + 2 i)


@register_control
@dataclass(kw_only=True)
class NullTextInversion(InvertedLatents):
    """Start from the DDIM inversion of `image` (as `inverted-latents` does) and give the unconditional branch, at
    every step, the null-text embedding tuned for this run's cfg and steps (computed once per setting).

    inner_steps: Adam steps per sampling step (the paper: 10); lr: their learning rate (the paper: 0.01, decayed
    linearly to half over the run). Needs the DDIM scheduler and cfg > 1 (at cfg 1 there is no unconditional
    branch to tune). The run's negative prompt is where the tuning starts (the paper: the empty prompt).
    """

    name: ClassVar[str] = "null-text-inversion"

    inner_steps: int = 10
    lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_integer(self.inner_steps) or self.inner_steps < 1:
            raise InputError(f"null-text inversion inner_steps must be an integer >= 1, got {self.inner_steps!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise InputError(f"null-text inversion lr must be a number > 0, got {self.lr!r}")
        self._tuned: dict[Any, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}

    def cache_key(self, ctx: Context) -> tuple:
        r = ctx.request
        return (*super().cache_key(ctx), float(r.cfg), tuple(r.negative_prompts()), self.inner_steps, self.lr)

    def start(self, ctx: Context) -> bool:
        if ctx.request.scheduler != "ddim":
            raise InputError(f"null-text inversion tunes DDIM steps: use scheduler 'ddim' (got "
                             f"{ctx.request.scheduler!r})")
        if ctx.request.cfg == 1.0:
            raise InputError("null-text inversion tunes the unconditional branch of classifier-free guidance: "
                             "give cfg > 1")
        key = self.cache_key(ctx)
        if key not in self._tuned:
            self._tuned[key] = self._tune(ctx)
        x_t, self._embeddings = self._tuned[key]
        self.begin(ctx, x_t)
        return True

    def _tune(self, ctx: Context) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Invert (keeping every latent), then run the tuning pass over the same steps under the source caption."""
        from mmsynth.sample.sampler import sample

        recorder = _Trajectory()
        invert(ctx.bundle, self.image, self.source_prompt, steps=len(ctx.timesteps), cfg=self.inversion_cfg,
               height=ctx.height, width=ctx.width, strength=self.strength, controls=[recorder])
        pivots = recorder.latents  # z*_0 (the image), z*_1, ..., z*_k (k = the steps inverted)
        tuner = _NullTextTuner(owner=self, pivots=pivots)
        source = dataclasses.replace(ctx.request, prompt=self.source_prompt, n=pivots[0].shape[0], controls=[])
        sample(ctx.bundle, source, [tuner], progress=False, decode=False)
        return pivots[-1], tuner.embeddings

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        if branch.name != "uncond":
            return None
        e = self._embeddings[step.index]
        n = latents.shape[0]
        return ModelInputs(context=(e if e.shape[0] == n else e.repeat(n, 1, 1)).to(latents.device))


@dataclass(kw_only=True)
class _Trajectory(Control):
    """Internal: records the latent before the first step and after every step (the inversion's pivots)."""

    name: ClassVar[str] = "trajectory"

    def prepare(self, ctx: Context) -> None:
        self.latents: list[torch.Tensor] = []

    def before(self, ctx: Context, step: Step, latents: torch.Tensor, predict: Predict) -> torch.Tensor:
        if step.index == 0 and not self.latents:
            self.latents.append(latents.detach().clone())
        return latents

    def after_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.latents.append(latents.detach().clone())
        return latents


@dataclass(kw_only=True)
class _NullTextTuner(Control):
    """Internal: the tuning pass. Starts at the last pivot; before each step it optimises the unconditional
    context so that the guided step lands on the next pivot (each image alone: one that has converged stops
    moving), then lets the loop take the step with it."""

    name: ClassVar[str] = "null-text-tuner"
    owner: Any = None
    pivots: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def prepare(self, ctx: Context) -> None:
        uncond = next(b for b in ctx.branches if b.name == "uncond")
        self._null = uncond.context.detach().clone()
        self.embeddings: dict[int, torch.Tensor] = {}

    def start(self, ctx: Context) -> bool:
        self.owner.begin(ctx, self.pivots[-1])
        return True

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        return ModelInputs(context=self._null) if branch.name == "uncond" else None

    def before(self, ctx: Context, step: Step, latents: torch.Tensor, predict: Predict) -> torch.Tensor:
        k = len(self.pivots) - 1
        target = self.pivots[k - 1 - step.index].to(latents)
        z = latents.detach()
        null = self._null.detach().clone().requires_grad_(True)
        self._null = null
        lr = float(self.owner.lr) * (1 - 0.5 * step.index / step.count)
        opt = torch.optim.Adam([null], lr=lr)
        tolerance = TOLERANCE * (1 + 2 * step.index)
        guided = _with_fixed_conditions(ctx, predict, z)
        with torch.enable_grad():
            for _ in range(int(self.owner.inner_steps)):
                out = guided()
                prev = ctx.scheduler.step(out, step.t, z, return_dict=False)[0]
                loss = ((prev - target) ** 2).flatten(1).mean(1)  # per image
                moving = loss.detach() >= tolerance
                if not moving.any():
                    break
                (null.grad,) = torch.autograd.grad(loss[moving].sum(), [null])
                frozen = null.detach()[~moving].clone()
                opt.step()
                with torch.no_grad():
                    null[~moving] = frozen
        self._null = null.detach()
        self.embeddings[step.index] = self._null
        return latents


def _with_fixed_conditions(ctx: Context, predict: Predict, z: torch.Tensor) -> Any:
    """The guided prediction at z as a function of the unconditional branch only: the other branches do not
    depend on the null-text embedding, so they are computed once (the loop's guidance sum, uncond first:
    u + sum_b w_b (o_b - u)); halves the cost of each Adam step."""
    first, *rest = ctx.branches
    if first.name != "uncond":  # pragma: no cover - the loop always puts the negative prompt first
        return lambda: predict(z)
    with torch.no_grad():
        fixed = [(b.weight, predict(z, branch=b.name)) for b in rest]

    def guided() -> torch.Tensor:
        u = predict(z, branch="uncond")
        return u + sum(w * (o - u) for w, o in fixed)

    return guided
