"""Text-to-image latent diffusion: train a UNet on frozen-VAE latents, cross-attending to frozen CLIP text.

Stable Diffusion's recipe in miniature; the denoising story itself (caption dropout, timesteps, targets,
min-SNR weighting) is `DenoisingRecipe`'s (train/denoising.py). What this recipe adds: where its models come
from (the zoo's CLIP and VAE exports and a fresh UNet, or a complete bundle to fine-tune), TokenCompose's
grounding loss (options.grounding_weight), the progress grid through mmsynth's sampler, and the export as a
bundle diffusers' StableDiffusionPipeline loads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mmsynth.errors import InputError
from mmsynth.io import write_text
from mmsynth.models.bundle import CLIP_FOLDER, Bundle, load_component
from mmsynth.models.zoo import ZOO_SPECS, build_scheduler, build_unet
from mmsynth.train.denoising import DenoisingOptions, DenoisingRecipe, DenoisingStep
from mmsynth.train.grounding import CrossAttentionRecorder, token_grounding_loss, token_groups
from mmsynth.train.latent_cache import LatentCacheExamples
from mmsynth.viz import grid, label

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_PROMPTS = (
    "a red circle",
    "a blue square",
    "a large yellow star",
    "a green triangle left of a pink cross",
    "two orange circles",
    "a purple star above a cyan square",
    "three blue crosses",
    "",
)


BASE_CARD = "base_card.md"  # the base bundle's README.md as it was when the run began (see started)


@dataclass
class TextToImageOptions(DenoisingOptions):
    clip: str = "runs/clip/final"  # folder with tokenizer/ + text_encoder/ (+ clip/): a `mmsynth train clip` export
    vae: str = "runs/vae/final"  # folder with vae/: a `mmsynth train vae` export
    base: str | None = None  # a complete bundle (e.g. Stable Diffusion) whose UNet is fine-tuned instead
    zoo: str = "shapes-v1"  # UNet size when training from scratch
    grounding_weight: float = 0.0  # > 0: add TokenCompose's token grounding loss (train/grounding.py); needs scenes
    sample_prompts: tuple[str, ...] = SAMPLE_PROMPTS
    sample_steps: int = 25
    sample_cfg: float = 4.0
    save_dtype: str = "float16"  # weights of the exported bundle (loaded back as float32); keeps the zoo small

    def validate(self) -> None:
        super().validate()
        if self.zoo not in ZOO_SPECS:
            raise InputError(f"config key 'options.zoo' must be one of {', '.join(ZOO_SPECS)}, got '{self.zoo}'")
        if self.grounding_weight < 0:
            raise InputError(f"config key 'options.grounding_weight' must be >= 0, got {self.grounding_weight}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")
        if self.sample_steps <= 0 or self.sample_cfg < 0:
            raise InputError("config keys 'options.sample_steps' must be > 0 and 'options.sample_cfg' >= 0")


class TextToImageRecipe(DenoisingRecipe):
    name = "t2i"
    Options = TextToImageOptions
    description = "latent diffusion UNet on frozen VAE latents and frozen CLIP text (caption dropout for CFG)"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 64, "lr": 5e-4, "warmup_steps": 200}

    # ---------------------------------------------------------------- set-up
    def build(self) -> None:
        o = self.options
        if o.base:
            b = Bundle.from_pretrained(o.base, load_clip=True)
            tokenizer, text_encoder, vae, unet, scheduler, clip = (
                b.tokenizer, b.text_encoder, b.vae, b.unet, b.scheduler, b.clip,
            )  # fmt: skip
        else:
            tokenizer = load_component(o.clip, "tokenizer")
            text_encoder = load_component(o.clip, "text_encoder")
            clip = load_component(o.clip, CLIP_FOLDER) if (Path(o.clip) / CLIP_FOLDER).is_dir() else None
            vae = load_component(o.vae, "vae")
            spec = ZOO_SPECS[o.zoo]
            unet = build_unet(spec, cross_attention_dim=int(text_encoder.config.hidden_size))
            scheduler = build_scheduler()
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if vae.config.latent_channels != unet.config.in_channels or spec.resolution % factor:
                raise InputError(
                    f"options.vae ({o.vae}) has {vae.config.latent_channels} latent channels and factor {factor}; "
                    f"the '{o.zoo}' UNet expects {unet.config.in_channels} channels at {spec.resolution} px"
                )
        self.tokenizer, self.clip = tokenizer, clip
        self.set_scheduler(scheduler)
        self.models = {"text_encoder": text_encoder, "vae": vae, "unet": unet}
        self.trainable = ("unet",)
        self.recorder = CrossAttentionRecorder(unet) if o.grounding_weight > 0 else None

    def started(self, step: int) -> None:
        """Copy the base's model card into the run folder as it was when the run began (kept on --resume).

        `mmsynth zoo ship t2i` adds the steps that card gives to the run's own; the base is often the bundle the run
        is reshipped over, whose card by then already counts the run.
        """
        if not self.options.base:
            return
        card, kept = Path(self.options.base) / "README.md", Path(self.config.out) / BASE_CARD
        if card.is_file() and (step == 0 or not kept.exists()):
            write_text(card.read_text(encoding="utf-8"), kept)

    # ---------------------------------------------------------------- what differs from the base: grounding
    def dataset(self) -> Dataset:
        examples = super().dataset()
        if isinstance(examples, LatentCacheExamples) and self.recorder is not None:
            raise InputError(
                f"options.grounding_weight needs each example's scene for its masks; the latent cache "
                f"'{self.config.data}' keeps none: use data: shapes or an imagefolder export"
            )
        return examples

    def vae_origin(self) -> str:
        o = self.options
        return f"options.base ('{o.base}')" if o.base else f"options.vae ('{o.vae}')"

    def recording(self) -> AbstractContextManager[Any]:
        return self.recorder.record() if self.recorder is not None else super().recording()

    def extra_loss(self, step: DenoisingStep, batch: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """TokenCompose's grounding term on the attention maps `recording` kept (captions after dropout)."""
        if self.recorder is None:
            return None, {}
        grounding = token_grounding_loss(step.recorded, *self.token_masks(list(batch["caption"]), batch.get("scene")))
        return self.options.grounding_weight * grounding, {"grounding": float(grounding.detach())}

    def token_masks(self, captions: list[str], scenes: list[Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's group masks and each text token's group (-1: none), as `encode_text` tokenizes."""
        offsets = self.tokenize(captions, return_offsets_mapping=True).offset_mapping
        return token_groups(captions, scenes or [None] * len(captions), offsets)

    # ---------------------------------------------------------------- viewing and export
    def bundle(self) -> Bundle:
        return Bundle(
            tokenizer=self.tokenizer,
            text_encoder=self.unwrapped("text_encoder"),
            vae=self.models["vae"],
            unet=self.unwrapped("unet"),
            scheduler=self.scheduler,
            clip=self.clip,
        )

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """The sample prompts through mmsynth's one sampler (DDIM, seed i for prompt i), one labelled tile each."""
        from mmsynth.sample import GenerationRequest, sample

        b = self.bundle()
        unet_was_training = b.unet.training
        b.unet.eval()
        tiles = []
        for i, prompt in enumerate(self.options.sample_prompts):
            request = GenerationRequest(prompt=prompt, n=1, seed=i, steps=self.options.sample_steps,
                                        cfg=self.options.sample_cfg, scheduler="ddim")  # fmt: skip
            image = sample(b, request, progress=False).images[0]
            tiles.append(label(image, prompt or "(empty)", height=10))
        b.unet.train(unet_was_training)
        return grid(tiles, cols=min(4, len(tiles)))

    def export(self, out: Path) -> Path:
        return self.bundle().save_pretrained(out, dtype=SAVE_DTYPES[self.options.save_dtype])
