"""The one sampling loop: text -> latents -> images, with every control a plugin the loop consults.

The loop owns the scheduler, the batch and the guidance sum; controls (controls.py) own their
conditions and say per step and per branch what they add. With no controls it computes exactly
what diffusers' StableDiffusionPipeline computes (same tokenisation, noise, CFG formula, scheduler
calls and decoding), which the tests check.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from mmsynth.errors import InputError
from mmsynth.models.denoiser import Denoiser, ModelInputs, make_denoiser
from mmsynth.models.tokenizer import tokenize_padded, warn_if_truncated, warn_unknown_words
from mmsynth.sample.attention import AttentionService
from mmsynth.sample.controls import Branch, Control, Step, merge_inputs
from mmsynth.sample.request import GenerationRequest
from mmsynth.sample.schedulers import make_scheduler

if TYPE_CHECKING:
    from mmsynth.models.bundle import Bundle


@dataclass
class SampleResult:
    """images: N x H x W x 3 uint8; latents: the final latents (N x C x h x w); one replayable request per image;
    selection: with best_of > 1, per image the candidate kept and every candidate's CLIP distance (best_of.py)."""

    images: np.ndarray
    latents: torch.Tensor
    requests: list[GenerationRequest]
    selection: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------- text
def encode_text(bundle: Bundle, prompts: list[str]) -> torch.Tensor:
    """CLIP text hidden states, tokenised like diffusers (padded to the tokenizer's max length); SDXL's are both
    encoders' penultimate states side by side."""
    if getattr(bundle, "is_xl", False):
        return encode_xl_text(bundle, prompts)[0]
    tok = bundle.tokenizer
    ids = tokenize_padded(tok, prompts, return_tensors="pt")
    enc = bundle.text_encoder
    mask = ids.attention_mask.to(bundle.device) if getattr(enc.config, "use_attention_mask", False) else None
    return enc(ids.input_ids.to(bundle.device), attention_mask=mask)[0].to(bundle.dtype)


def encode_xl_text(bundle: Bundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning as StableDiffusionXLPipeline.encode_prompt computes it: each text encoder's
    penultimate hidden states, concatenated along features, and the last encoder's pooled projection."""
    hidden, pooled = [], None
    for tok, enc in ((bundle.tokenizer, bundle.text_encoder), (bundle.tokenizer_2, bundle.text_encoder_2)):
        if enc is None:  # the refiner has only the second
            continue
        ids = tokenize_padded(tok, prompts, return_tensors="pt")
        out = enc(ids.input_ids.to(next(enc.parameters()).device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds come first
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise InputError("this SDXL model's second text encoder gives no pooled projection (a "
                         "CLIPTextModelWithProjection is expected)")
    return torch.cat(hidden, dim=-1).to(bundle.dtype), pooled.to(bundle.dtype)


def xl_time_ids(bundle: Bundle, height: int, width: int, negative: bool = False) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop corner (0, 0) and target size (the pipeline's defaults: the
    image's own size); the refiner's is original size, crop corner and an aesthetic score (6, 2.5 when negative)."""
    if bundle.requires_aesthetics_score:
        ids = [height, width, 0, 0, 2.5 if negative else 6.0]
    else:
        ids = [height, width, 0, 0, height, width]
    return torch.tensor([ids], dtype=bundle.dtype, device=bundle.device)


def has_text_encoder(bundle: Any) -> bool:
    """A model conditioned only on an image embedding (Paint-by-Example) has neither tokenizer nor text encoder."""
    return getattr(bundle, "text_encoder", None) is not None and getattr(bundle, "tokenizer", None) is not None


def warn_about_prompt(bundle: Bundle, prompt: str) -> list[str]:
    """Warn (log) about words the tokenizer cannot read, and about a prompt cut at its length limit; returns the
    unknown words."""
    if not prompt:
        return []
    warn_if_truncated(bundle.tokenizer, prompt)
    return warn_unknown_words(bundle.tokenizer, prompt)


def guidance_branches(bundle: Bundle, request: GenerationRequest, height: int | None = None,
                      width: int | None = None) -> list[Branch]:
    """The condition sets of the guidance sum: [uncond (negative prompt), cond(weight=cfg)], or [cond] at cfg 1.

    Text is encoded only for a model that reads it; without a text encoder the branches carry no context and a
    control must give one (`ModelInputs.context`), and a prompt is an error rather than silently unread. An SDXL
    branch also carries its pooled text and time ids (`Branch.added_cond`, for images of height x width); an empty
    negative prompt is zeros where the model says so (force_zeros_for_empty_prompt), as in diffusers.
    """
    if getattr(bundle, "is_xl", False):
        return _xl_branches(bundle, request, height or bundle.resolution, width or bundle.resolution)
    if not has_text_encoder(bundle):
        given = [p for p in (*request.prompts(), *request.negative_prompts()) if p]
        if given:
            raise InputError(f"this model has no text encoder, so it cannot read the prompt '{given[0]}'; leave the "
                             "prompt and negative prompt empty and condition it through a control")
        if request.cfg == 1.0:
            return [Branch("cond", 1.0, None)]
        return [Branch("uncond", 0.0, None), Branch("cond", float(request.cfg), None)]

    def encode(prompt: str | list[str]) -> torch.Tensor:
        if isinstance(prompt, list):  # one per image
            return encode_text(bundle, prompt)
        return encode_text(bundle, [prompt]).repeat(request.n, 1, 1)  # one prompt, encoded once for all n

    cond = encode(request.prompt)
    if request.cfg == 1.0:
        return [Branch("cond", 1.0, cond)]
    uncond = encode(request.negative_prompt)
    return [Branch("uncond", 0.0, uncond), Branch("cond", float(request.cfg), cond)]


def _xl_branches(bundle: Bundle, request: GenerationRequest, height: int, width: int) -> list[Branch]:
    n = request.n

    def encode(prompt: str | list[str], negative: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        texts = list(prompt) if isinstance(prompt, list) else [prompt]
        if negative and bundle.force_zeros_for_empty_prompt and not any(texts):
            context, pooled = (torch.zeros_like(x) for x in encode_xl_text(bundle, [""]))
        else:
            context, pooled = encode_xl_text(bundle, texts)
        if context.shape[0] == 1:
            context, pooled = context.repeat(n, 1, 1), pooled.repeat(n, 1)
        return context, {"text_embeds": pooled, "time_ids": xl_time_ids(bundle, height, width, negative).repeat(n, 1)}

    cond = Branch("cond", float(request.cfg), *encode(request.prompt, False))
    if request.cfg == 1.0:
        return [cond]
    return [Branch("uncond", 0.0, *encode(request.negative_prompt, True)), cond]


# ---------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """Everything a run shares: the bundle, its denoiser, encoded branches, scheduler, generators, the current latents
    and the attention service the loop applies after the controls have prepared."""

    bundle: Any
    request: GenerationRequest
    controls: list[Control]
    scheduler: Any
    branches: list[Branch]
    generators: list[torch.Generator]
    height: int
    width: int
    timesteps: torch.Tensor
    denoiser: Denoiser
    latents: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared between controls, per run
    attention: AttentionService = field(init=False)
    # where each control's extra context tokens sit in the context of the last model call ("text": the prompt's)
    token_slices: dict[str, slice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attention = AttentionService(self.denoiser.network)

    @classmethod
    def create(cls, bundle: Bundle, request: GenerationRequest, controls: list[Control]) -> Context:
        denoiser = make_denoiser(pick_network(bundle, controls), getattr(bundle, "vae", None),
                                 bundle.scheduler.config.prediction_type)
        f = denoiser.scale_factor
        height, width = request.height or denoiser.resolution, request.width or denoiser.resolution
        for side, value in (("height", height), ("width", width)):
            if value % f:
                nearest = max(f, round(value / f) * f)
                raise InputError(f"{side} {value} is not a multiple of the model's VAE factor {f}; the nearest valid "
                                 f"{side} is {nearest}")
        most = bundle.scheduler.config.num_train_timesteps
        if request.steps > most:
            raise InputError(f"steps {request.steps} is more than the model's {most} training timesteps; use at most "
                             f"{most}")
        if has_text_encoder(bundle):
            for text in dict.fromkeys([*request.prompts(), *request.negative_prompts()]):
                warn_about_prompt(bundle, text)
        scheduler = make_scheduler(request.scheduler, bundle.scheduler)
        scheduler.set_timesteps(request.steps, device=bundle.device)
        gens = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.n)]
        branches = guidance_branches(bundle, request, height, width)
        ctx = cls(bundle, request, controls, scheduler, branches, gens, height, width, scheduler.timesteps, denoiser)
        for c in controls:  # condition sets are data: a control may add or replace branches (Composer's directions)
            ctx.branches = c.condition_sets(ctx, ctx.branches)
        if not ctx.branches:
            raise InputError("the controls left no condition set to sample with")
        return ctx

    # ---- geometry and noise
    @property
    def device(self) -> torch.device:
        return self.bundle.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bundle.dtype

    @property
    def network(self) -> torch.nn.Module:
        """The network this run calls (the module attention taps and hooks go on)."""
        return self.denoiser.network

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.denoiser.scale_factor
        return (self.request.n, self.denoiser.latent_channels, self.height // f, self.width // f)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def sigma_space(self) -> bool:
        """True for schedulers whose latents are x0 + sigma * eps (Euler), not variance preserving."""
        return float(self.scheduler.init_noise_sigma) != 1.0

    def noise(self, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """Gaussian noise drawn image by image from the per-image generators (seed + i), like diffusers."""
        return randn_tensor(tuple(shape or self.latent_shape), generator=self.generators, device=self.device,
                            dtype=self.dtype)

    def step_kwargs(self) -> dict[str, Any]:
        import inspect

        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = self.request.eta
        if "generator" in accepted:
            kwargs["generator"] = self.generators
        return kwargs

    def make_step(self, i: int) -> Step:
        """Step i of the timesteps this run executes, with its noise levels."""
        t = self.timesteps[i]
        if self.sigma_space:
            offset = len(self.scheduler.timesteps) - len(self.timesteps)
            s, s_next = (float(self.scheduler.sigmas[offset + i + d]) for d in (0, 1))
            a, a_prev = 1.0 / (1.0 + s * s), 1.0 / (1.0 + s_next * s_next)
            return Step(i, len(self.timesteps), t, a, a_prev, input_scale=math.sqrt(a))
        acp = self.scheduler.alphas_cumprod
        a = float(acp[int(t)])
        if i + 1 < len(self.timesteps):
            a_prev = float(acp[int(self.timesteps[i + 1])])
        else:
            a_prev = float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))
        return Step(i, len(self.timesteps), t, a, a_prev)

    def active(self, step: Step) -> list[Control]:
        return [c for c in self.controls if c.schedule.active(step)]

    # ---- the model call
    def predict(self, latents: torch.Tensor, step: Step, branch: str | None = None,
                controls: list[Control] | None = None) -> torch.Tensor:
        """The guided model output at `latents` (or one branch's raw output), with every active control's inputs.

        Each control is asked once per call for all the branches it applies to (`Control.branch_inputs`, so a
        ControlNet runs once per step however many branches there are). Differentiable with respect to `latents`
        when called under torch.enable_grad() (guidance hooks do).
        """
        controls = self.active(step) if controls is None else controls
        branches = self.branches if branch is None else [b for b in self.branches if b.name == branch]
        if not branches:
            raise ValueError(f"no guidance branch {branch!r}; branches: {[b.name for b in self.branches]}")
        model_in = self.scheduler.scale_model_input(latents, step.t)
        given: list[list[tuple[ModelInputs, Control]]] = [[] for _ in branches]
        for c in controls:
            wanted = [i for i, b in enumerate(branches) if c.schedule.applies_to(b.name)]
            if not wanted:
                continue
            for i, mi in zip(wanted, c.branch_inputs(self, step, [branches[i] for i in wanted], model_in)):
                if mi is not None:
                    given[i].append((mi, c))
        per_branch = [merge_inputs([(mi, c.schedule) for mi, c in items]) for items in given]
        for b, mi in zip(branches, per_branch):  # SDXL: the branch's own pooled text and time ids
            if b.added_cond is not None:
                mi.added_cond_kwargs = {**b.added_cond, **(mi.added_cond_kwargs or {})}
        self._note_token_slices(branches, per_branch, given)
        outs = self._run_model(model_in, step.t, branches, per_branch)
        ref, result = outs[0], outs[0]
        for b, out in zip(branches[1:], outs[1:]):
            result = result + b.weight * (out - ref)
        return result

    def _note_token_slices(self, branches: list[Branch], merged: list[ModelInputs],
                           given: list[list[tuple[ModelInputs, Control]]]) -> None:
        """Where the text and each control's extra tokens sit in the context: per branch the text comes first, then
        the extra tokens in control order (a control that gives only some branches tokens is placed as in those)."""
        slices: dict[str, slice] = {}
        for b, mi_merged, items in zip(branches, merged, given):
            context = mi_merged.context if mi_merged.context is not None else b.context
            offset = 0 if context is None else int(context.shape[1])
            slices.setdefault("text", slice(0, offset))
            for mi, c in items:
                if mi.extra_context is not None:
                    slices.setdefault(c.name, slice(offset, offset + int(mi.extra_context.shape[1])))
                    offset += int(mi.extra_context.shape[1])
        self.token_slices = slices

    def _run_model(self, model_in: torch.Tensor, t: torch.Tensor, branches: list[Branch],
                   inputs: list[ModelInputs]) -> list[torch.Tensor]:
        """One batched denoiser call per group of branches whose inputs can share a batch (usually one call)."""
        _zero_fill_residuals(inputs)
        groups: dict[Any, list[int]] = {}
        for i, (b, mi) in enumerate(zip(branches, inputs)):
            groups.setdefault(_signature(b, mi), []).append(i)
        outs: list[torch.Tensor | None] = [None] * len(branches)
        for idx in groups.values():
            parts = [(branches[i], inputs[i]) for i in idx]
            self.attention.branches = [b.name for b, _ in parts]
            x, batched = _batched(model_in, parts)
            for i, out in zip(idx, self.denoiser(x, t, batched).chunk(len(idx))):
                outs[i] = out
        return outs  # type: ignore[return-value]

    # ---- the latent space
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (n x 3 x H x W), sampled with image i's generator (diffusers' img2img)."""
        return self.denoiser.encode(images.to(self.device), self.generators).to(self.dtype)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of the posterior MEAN (deterministic: inversion and blending must not draw noise)."""
        return self.denoiser.encode(images.to(device=self.device, dtype=self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents, in the run's dtype."""
        return self.denoiser.decode(latents).to(self.dtype)

    def renoise(self, latents: torch.Tensor, step: Step, target: Step | None = None) -> torch.Tensor:
        """Take the latent `step` returned (at its next level) back to the level of `target` (default: step itself)
        with fresh noise, q(z_t | z_s): self-recurrence re-noises one step, RePaint's jumps several."""
        target = target or step
        s_prev = math.sqrt(step.alpha_bar_prev) if self.sigma_space else 1.0
        ratio = target.alpha_bar / step.alpha_bar_prev
        z = math.sqrt(ratio) * latents * s_prev + math.sqrt(max(1.0 - ratio, 0.0)) * self.noise(latents.shape)
        return z / target.input_scale


def pick_network(bundle: Any, controls: list[Control]) -> Any:
    """The network a run calls: the bundle's own, unless a control asks for one of its extras (an inpainting UNet)."""
    wanted = {name for c in controls if (name := c.unet_name(bundle)) is not None}
    if len(wanted) > 1:
        raise InputError(f"controls ask for different UNets ({', '.join(sorted(wanted))}); one run calls one UNet")
    if not wanted:
        return bundle.unet
    name = wanted.pop()
    extras = getattr(bundle, "extras", {})
    if extras.get(name) is None:
        raise InputError(f"a control asks for the bundle's '{name}' UNet, which this model does not have")
    return extras[name]


def _batched(model_in: torch.Tensor, parts: list[tuple[Branch, ModelInputs]]) -> tuple[torch.Tensor, ModelInputs]:
    """The latents repeated once per branch and the branches' inputs concatenated along the batch, for one call."""
    k = len(parts)
    mis = [mi for _, mi in parts]
    contexts = []
    for b, mi in parts:
        c = mi.context if mi.context is not None else b.context
        if c is not None and mi.extra_context is not None:
            c = torch.cat([c, mi.extra_context], dim=1)
        contexts.append(c)
    batched = ModelInputs(context=None if contexts[0] is None else (torch.cat(contexts) if k > 1 else contexts[0]))
    for f in dataclasses.fields(ModelInputs):
        if f.name in ("context", "extra_context"):
            continue
        values = [getattr(mi, f.name) for mi in mis]
        if values[0] is not None:
            setattr(batched, f.name, _cat_tree(values))
    return (torch.cat([model_in] * k) if k > 1 else model_in), batched


# ---------------------------------------------------------------------------------------------- batching helpers
_RESIDUAL_KINDS = ("down_residuals", "mid_residual", "down_intrablock_residuals")


def _zero_fill_residuals(inputs: list[ModelInputs]) -> None:
    """A branch without a residual kind that another branch has gets zeros (exact: residuals are added)."""
    for kind in _RESIDUAL_KINDS:
        given = next((getattr(mi, kind) for mi in inputs if getattr(mi, kind) is not None), None)
        if given is None:
            continue
        for mi in inputs:
            if getattr(mi, kind) is None:
                zeros = [torch.zeros_like(x) for x in given] if isinstance(given, list) else torch.zeros_like(given)
                setattr(mi, kind, zeros)


def _structure(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape[1:]), x.dtype)
    if isinstance(x, dict):
        return tuple(sorted((k, _structure(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_structure(v) for v in x)
    return repr(x)


def _signature(branch: Branch, mi: ModelInputs) -> Any:
    """Branches with equal signatures can be concatenated into one batch."""
    context = mi.context if mi.context is not None else branch.context
    return (_structure(context), _structure(mi.extra_context), _structure(mi.extra_channels),
            _structure(mi.class_labels), _structure(mi.timestep_cond), _structure(mi.cross_attention_kwargs),
            _structure(mi.added_cond_kwargs))


def _cat_tree(values: list[Any]) -> Any:
    """Concatenate matching trees of tensors along the batch; other leaves are equal, keep the first."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values) if len(values) > 1 else first
    if isinstance(first, dict):
        return {k: _cat_tree([v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_cat_tree([v[i] for v in values]) for i in range(len(first))]
    return first


# ---------------------------------------------------------------------------------------------- the loop
def _start(ctx: Context) -> None:
    starters = [c for c in ctx.controls if c.start(ctx)]
    if len(starters) > 1:
        raise InputError(f"controls {', '.join(c.name for c in starters)} all set the initial latents; use one")
    if ctx.latents is None:
        ctx.latents = ctx.noise() * ctx.scheduler.init_noise_sigma


def _denoise_step(ctx: Context, step: Step) -> torch.Tensor:
    """One step: controls' `before`, the guided prediction, their `after`, the scheduler; repeated k times."""
    active = ctx.active(step)
    k = max([c.repeats(ctx, step) for c in active], default=1)
    predict = partial(ctx.predict, step=step, controls=active)
    latents = ctx.latents
    differentiable = any(c.wants_gradient(ctx, step) for c in active)
    for r in range(k):
        for c in active:
            latents = c.before(ctx, step, latents, predict)
        with torch.enable_grad() if differentiable else torch.no_grad():
            z = latents.detach().requires_grad_(True) if differentiable else latents
            out = ctx.predict(z, step, controls=active)
            for c in active:
                out = c.after(ctx, step, z, out)
        out = out.detach()
        snapshot = copy.deepcopy(ctx.scheduler) if r < k - 1 else None
        prev = ctx.scheduler.step(out, step.t, latents, **ctx.step_kwargs(), return_dict=False)[0]
        for c in active:  # on every pass: a repeat re-noises the blended latent (RePaint), not the raw one
            prev = c.after_step(ctx, step, prev)
        if snapshot is not None:  # rewind the scheduler (multistep solvers keep history) and re-noise to t
            ctx.scheduler = snapshot
            latents = ctx.renoise(prev, step)
    return prev


def _run_steps(ctx: Context, progress: bool) -> None:
    """Every step in order; a control's `jump` sends the loop back (re-noised, the scheduler as it was there)."""
    jumpers = any(type(c).jump is not Control.jump for c in ctx.controls)
    snapshots: dict[int, Any] = {}
    i = 0
    with tqdm(total=len(ctx.timesteps), desc="sampling", disable=not progress, leave=False) as bar:
        while i < len(ctx.timesteps):
            step = ctx.make_step(i)
            if jumpers:
                snapshots[i] = copy.deepcopy(ctx.scheduler)
            ctx.latents = _denoise_step(ctx, step)
            back = max([c.jump(ctx, step) for c in ctx.active(step)], default=0) if jumpers else 0
            if not 0 <= back <= i + 1:
                raise ValueError(f"a control asked to jump back {back} steps from step {i}")
            if back:
                target = ctx.make_step(i + 1 - back)
                ctx.latents = ctx.renoise(ctx.latents, step, target)
                ctx.scheduler = snapshots[target.index]
                i = target.index
                continue
            bar.update(1)
            i += 1


def _check_finite(x: torch.Tensor, what: str) -> None:
    """Never a garbage image with exit 0: NaN here means a corrupt model or an absurd scale, and the user must know."""
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"sampling produced NaN or infinite {what}: the model's weights or config may be corrupt, "
                         "or a scale (cfg, guidance strength) is far too large")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] n x 3 x H x W -> n x H x W x 3 uint8, rounded like diffusers' image processor."""
    x = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype(np.uint8)


@torch.no_grad()
def sample(bundle: Bundle, request: GenerationRequest, controls: list[Control] | None = None,
           progress: bool = True, decode: bool = True) -> SampleResult:
    """Generate `request.n` images. `controls` default to those described in the request (and are recorded there).

    decode=False skips the VAE (inversion, latent pipelines): images is then an empty array.
    With `request.best_of` K > 1 each image is the bundle CLIP's pick of K candidates (best_of.py).
    Each control is built once: from the request's dicts when `controls` is None (checking them builds them),
    else as given, and then recorded in the returned requests with one `to_dict` each.
    """
    # the caller sized the request (the CLI checked its --max-side / --max-images)
    if controls is None:
        controls = request.validated_controls(limits=None)
    else:
        dataclasses.replace(request, controls=[]).validate(limits=None)
        request = dataclasses.replace(request, controls=[c.to_dict() for c in controls])
    if request.best_of > 1:
        from mmsynth.sample.best_of import sample_best_of

        return sample_best_of(bundle, request, controls, progress=progress, decode=decode)
    return run_loop(bundle, request, controls, progress=progress, decode=decode)


def run_loop(bundle: Bundle, request: GenerationRequest, controls: list[Control], progress: bool = True,
             decode: bool = True) -> SampleResult:
    """The loop itself, for a checked request that already records `controls` (what `sample` hands on, and what
    best-of candidates and nested source runs call without re-encoding the controls' images)."""
    ctx = Context.create(bundle, request, controls)
    prepared: list[Control] = []
    try:
        for c in controls:
            prepared.append(c)
            c.prepare(ctx)
        ctx.attention.apply()  # after every control registered its taps and hooks (a nested run may happen there)
        _start(ctx)
        _run_steps(ctx, progress)
        _check_finite(ctx.latents, "latents")
        images = np.zeros((0, ctx.height, ctx.width, 3), np.uint8)
        if decode:
            pixels = ctx.decode(ctx.latents)
            for c in controls:
                pixels = c.decoded(ctx, pixels)
            _check_finite(pixels, "pixels")
            images = to_uint8(pixels)
    finally:
        ctx.attention.remove()
        for c in reversed(prepared):  # last in, first out
            c.close(ctx)
    request = dataclasses.replace(request, height=ctx.height, width=ctx.width)  # what was drawn, not None
    return SampleResult(images, ctx.latents, [request.for_image(i) for i in range(request.n)])
