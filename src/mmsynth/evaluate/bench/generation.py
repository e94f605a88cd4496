"""What produces a benchmark image: the run context (model, sampler settings, feature extractor) and the
standard row generators every suite reuses (ground-truth render, unconditioned base model, text-to-image).

A model's capabilities (`text`, `control:<kind>`, `layout`, `inpaint`, `img2img`) are looked up in a registry of
checks, so a control module declares what a bundle must carry for it (`register_capability`) and the runner can
skip, with a reason, the cases a model cannot honour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsynth.errors import InputError
from mmsynth.evaluate.bench.registry import Row
from mmsynth.sample.request import DEFAULT_BEST_OF, DEFAULT_CFG, DEFAULT_ETA, DEFAULT_SCHEDULER, DEFAULT_STEPS

if TYPE_CHECKING:
    from mmsynth.evaluate.bench.cases import Case
    from mmsynth.evaluate.fidelity import ImageFeatures
    from mmsynth.models.bundle import Bundle

EXTRACTORS = ("shapesclip", "inception")

# capability -> does this bundle have it
CAPABILITIES: dict[str, Callable[[Any], bool]] = {
    "text": lambda bundle: True,
    "img2img": lambda bundle: True,  # SDEdit works with any text-to-image bundle
    "inpaint": lambda bundle: True,  # blended-latent inpainting works with any text-to-image bundle
    "inpainting_unet": lambda bundle: has_inpainting_unet(bundle),  # a UNet that takes the mask and masked image
}


def has_inpainting_unet(bundle: Any) -> bool:
    """The bundle carries an inpainting UNet (unet_inpainting/), or its own UNet is one (SD inpainting weights)."""
    from mmsynth.models.bundle import INPAINTING_UNET

    own = int(bundle.unet.config.in_channels) == 2 * int(bundle.vae.config.latent_channels) + 1
    return own or INPAINTING_UNET in getattr(bundle, "extras", {})


def register_capability(name: str, check: Callable[[Any], bool]) -> None:
    """Declare how to tell whether a bundle can honour `name` (e.g. 'control:canny': it carries a canny ControlNet)."""
    CAPABILITIES[name] = check


def model_capabilities(bundle: Any) -> set[str]:
    return {name for name, check in CAPABILITIES.items() if check(bundle)}


@dataclass
class SamplerSettings:
    """Sampler settings shared by every model row of a run (a sweep row overrides some of them)."""

    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    scheduler: str = DEFAULT_SCHEDULER
    eta: float = DEFAULT_ETA
    best_of: int = DEFAULT_BEST_OF  # candidates per image ranked by the bundle's CLIP (sample/best_of.py)

    def with_overrides(self, overrides: dict[str, float]) -> SamplerSettings:
        """These settings with a row's sampler settings applied (settings that are not the sampler's are ignored)."""
        names = {f.name for f in dataclasses.fields(self)}
        cast = {k: (int(v) if k in ("steps", "best_of") else v if k == "scheduler" else float(v))
                for k, v in overrides.items() if k in names}  # fmt: skip
        return dataclasses.replace(self, **cast)


SAMPLER_SETTINGS = ("cfg", "steps", "eta", "best_of")  # the numeric sampler settings every model row can be swept over


@dataclass
class RunContext:
    """Per process: where the model is, how to sample, which feature extractor fidelity uses. Loads lazily."""

    model: str | Path | None = None
    device: str = "cpu"
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    extractor: str = "shapesclip"
    weights: str | Path | None = None
    progress: bool = False
    bundle_obj: Any = None  # a loaded Bundle may be given directly (tests, notebooks)
    batch_size: int = 8  # images per sampler call for rows that batch (1: every case alone)
    params: dict[str, Any] = field(default_factory=dict)  # the running row's own settings (Row.settings())
    _features: Any = None

    def bundle(self) -> Bundle:
        if self.bundle_obj is None:
            from mmsynth.models import Bundle
            from mmsynth.models.shipped import resolve_model

            self.bundle_obj = Bundle.from_pretrained(resolve_model(str(self.model) if self.model else None))
            self.bundle_obj.to(self.device)
        return self.bundle_obj

    def capabilities(self) -> set[str]:
        return model_capabilities(self.bundle())

    def request(self, case: Case, prompt: str | None = None) -> Any:
        """The generation request of a case under this run's sampler settings (the case's own seed, one image)."""
        from mmsynth.sample import GenerationRequest

        s = self.sampler
        return GenerationRequest(
            prompt=case.prompt if prompt is None else prompt,
            negative_prompt=case.negative_prompt,
            scheduler=s.scheduler,
            steps=s.steps,
            cfg=s.cfg,
            eta=s.eta,
            best_of=s.best_of,
            seed=case.seed,
            n=1,
            height=case.resolution,
            width=case.resolution,
        ).validate()

    def generate(self, case: Case, controls: list[Any] | None = None, prompt: str | None = None) -> np.ndarray:
        """One image of a case through the one sampler, with these control objects."""
        from mmsynth.sample import sample

        return sample(self.bundle(), self.request(case, prompt), controls=list(controls or []),
                      progress=False).images[0]

    def features(self) -> ImageFeatures:
        """The fidelity feature network: the bundle's CLIP vision tower, or Inception from local weights."""
        if self._features is None:
            if self.extractor == "inception":
                from mmsynth.evaluate.bench.extractors import inception_features

                self._features = inception_features(self.weights)
            else:
                from mmsynth.evaluate.bench.extractors import shapesclip_features

                self._features = shapesclip_features(self.bundle())
        return self._features


def check_extractor(extractor: str, weights: str | Path | None) -> None:
    if extractor not in EXTRACTORS:
        raise InputError(f"--extractor '{extractor}' is not one of {', '.join(EXTRACTORS)}")
    if extractor == "inception" and weights is None:
        raise InputError("--extractor inception needs --weights PATH (a local FID Inception weights file; "
                         "nothing is downloaded)")  # fmt: skip
    if weights is not None and extractor != "inception":
        raise InputError("--weights is the Inception weights file: it needs --extractor inception")
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"--weights '{weights}' does not exist or is not a file")


# ---------------------------------------------------------------- standard row generators


def ground_truth(ctx: RunContext, case: Case) -> np.ndarray:
    """The exact render of the case's scene: what a perfect model would produce (the ceiling)."""
    return case.render()


def vae_round_trip(ctx: RunContext, case: Case) -> np.ndarray:
    """The render encoded and decoded by the model's VAE (latent mean): the best any model drawing through this
    VAE can do, so a method's gap to the ground truth splits into what the VAE loses and what the UNet does."""
    import torch

    from mmsynth.sample.sampler import to_uint8

    bundle = ctx.bundle()
    vae = bundle.vae
    x = torch.from_numpy(case.render()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(bundle.device, vae.dtype)).latent_dist.mode()).sample
    return to_uint8(y.float())[0]  # pixels exactly as the sampler makes them


def reference_rows(*, vae: bool = True) -> dict[str, Row]:
    """The suites' shared ceilings: the exact render and (for latent models) that render through the VAE, so every
    suite reports a method between the same two references."""
    rows = {"ground_truth": Row("ground_truth", "reference", "renders of the scene specs (the ceiling)", ground_truth,
                                needs=lambda c: [], uses_model=False)}
    if vae:
        rows["vae_ceiling"] = Row("vae_ceiling", "reference", "the render through the model's VAE (a latent model's "
                                  "ceiling)", vae_round_trip, needs=lambda c: [])
    return rows


def base_unconditioned(ctx: RunContext, case: Case) -> np.ndarray:
    """The base model with an empty prompt and no controls: the chance level every method should beat."""
    return ctx.generate(case, prompt="")


def text_to_image(ctx: RunContext, case: Case) -> np.ndarray:
    """The base model with the case's prompt."""
    return ctx.generate(case)


def batched(
    prompt_of: Callable[[Case], str],
    controls_of: Callable[[RunContext, list[Case]], list[Any]] | None = None,
) -> Callable[[RunContext, list[Case]], list[np.ndarray]]:
    """A batch generator: cases whose seeds run on consecutively (as generated cases' do) and that share a
    size go through the sampler as one batch of prompts and negative prompts (image i gets seed + i, exactly
    as alone); any other case is generated alone. `controls_of` gives the controls of a list of cases (one
    case alone, or the whole batch); they must treat image i as case i (e.g. guides.PerImageGuides)."""

    def controls(ctx: RunContext, cases: list[Case]) -> list[Any]:
        return controls_of(ctx, cases) if controls_of is not None else []

    def generate(ctx: RunContext, cases: list[Case]) -> list[np.ndarray]:
        from mmsynth.sample import sample

        first = cases[0]
        same = all(c.seed == first.seed + i and c.resolution == first.resolution for i, c in enumerate(cases))
        if not same:
            return [ctx.generate(c, controls(ctx, [c]), prompt=prompt_of(c)) for c in cases]
        negatives = [c.negative_prompt for c in cases]
        request = dataclasses.replace(ctx.request(first, prompt=""), prompt=[prompt_of(c) for c in cases],
                                      negative_prompt=negatives if len(set(negatives)) > 1 else negatives[0],
                                      n=len(cases))  # fmt: skip
        return list(sample(ctx.bundle(), request.validate(), controls=controls(ctx, cases), progress=False).images)

    return generate


text_to_image_batch = batched(lambda c: c.prompt)
base_unconditioned_batch = batched(lambda c: "")
