"""Text-to-image latent diffusion: train a UNet on frozen-VAE latents, cross-attending to frozen CLIP text.

Stable Diffusion's recipe in miniature: caption dropout to the empty prompt (what classifier-free
guidance uses as its unconditional branch), uniform timesteps, epsilon or v-prediction targets,
optional min-SNR-gamma weighting. Methods built on the same denoising loss (ControlNet, adapters,
GLIGEN, ...) subclass this recipe and override `build`/`predict` rather than copying the loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr
from torch.utils.data import Dataset

from mmsynth.data.captions import flip_relations
from mmsynth.errors import InputError
from mmsynth.io import write_text
from mmsynth.models.bundle import CLIP_FOLDER, Bundle, load_component
from mmsynth.models.grow import MAX_DEPTH, deepen_attention
from mmsynth.models.tokenizer import tokenize_padded
from mmsynth.models.zoo import ZOO_SPECS, build_scheduler, build_unet
from mmsynth.train.grounding import CrossAttentionRecorder, token_grounding_loss, token_groups
from mmsynth.train.latent_cache import LatentCacheExamples
from mmsynth.train.recipe import Recipe
from mmsynth.viz import grid, label

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform", "cubic")
TEXT_ENCODER_INITS = ("pretrained", "random")
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
class TextToImageOptions:
    clip: str = "runs/clip/final"  # folder with tokenizer/ + text_encoder/ (+ clip/): a `mmsynth train clip` export
    vae: str = "runs/vae/final"  # folder with vae/: a `mmsynth train vae` export
    base: str | None = None  # a complete bundle (e.g. Stable Diffusion) whose UNet is fine-tuned instead
    # with base: a folder with tokenizer/ + text_encoder/ (+ clip/), e.g. a later `mmsynth train clip` export,
    # whose text side replaces the base's; the base's UNet is then fine-tuned to the new text encoder
    text_encoder: str | None = None
    zoo: str = "shapes-v1"  # UNet size when training from scratch
    attention_depth: tuple[int, ...] = ()  # transformer layers per level, e.g. 1,2,2: the UNet grown (models/grow.py)
    prediction_type: str = "epsilon"
    # True: Lin et al. 2024's fix of a noise schedule whose last step still shows the image: betas rescaled to zero
    # SNR at t = T (diffusers' rescale_betas_zero_snr) and "trailing" timesteps, so sampling starts at t = T,
    # where training now shows pure noise. Needs v_prediction (epsilon says nothing of the image at zero SNR). Why:
    # at the zoo's t = 999 (alpha_bar 0.0047) the shipped UNet's x0 guess still correlates 0.29 with the true
    # layout (0.07 from the pure noise sampling starts from), so it learned to read the layout from the noise
    # rather than from the caption (docs/training.md).
    zero_terminal_snr: bool = False
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting; None: plain MSE
    # how training timesteps are drawn: uniform, or T2I-Adapter's cubic t = (1 - u^3) T (u uniform), which puts
    # more of them at high noise, where a sample's layout (which objects, how many, where) is decided
    timestep_sampling: str = "uniform"
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (the CFG unconditional branch)
    grounding_weight: float = 0.0  # > 0: add TokenCompose's token grounding loss (train/grounding.py); needs scenes
    # > 0: a hinge asks that each caption with a relation denoise its image better, by relation_contrast_margin of
    # its loss, than the same caption with the relation flipped (same latents, noise and timestep), because plain
    # denoising leaves the zoo's UNet indifferent to the relation word (scripts/denoiser_relation_probe.py). On the
    # zoo it did not move that gap (configs/t2i_relation_contrast.yaml)
    relation_contrast_weight: float = 0.0
    relation_contrast_margin: float = 0.05
    relation_contrast_min_t: int = 300  # only timesteps at or above it: below, the layout is already fixed
    train_text_encoder: bool = False  # True: the text encoder trains with the UNet (LDM's joint text transformer)
    text_encoder_lr: float | None = None  # its learning rate when it trains (None: the run's lr)
    # "random": the text encoder keeps its config but starts from random weights (LDM trained its text transformer
    # from scratch with the UNet), because a CLIP-trained tower hardly separates relation words; needs
    # train_text_encoder. The CLIP, whose text tower it no longer is, is left out of the export.
    text_encoder_init: str = "pretrained"
    sample_prompts: tuple[str, ...] = SAMPLE_PROMPTS
    sample_steps: int = 25
    sample_cfg: float = 4.0
    save_dtype: str = "float16"  # weights of the exported bundle (loaded back as float32); keeps the zoo small

    def validate(self) -> None:
        if self.zoo not in ZOO_SPECS:
            raise InputError(f"config key 'options.zoo' must be one of {', '.join(ZOO_SPECS)}, got '{self.zoo}'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"config key 'options.prediction_type' must be one of {', '.join(PREDICTION_TYPES)}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise InputError("config key 'options.zero_terminal_snr' needs options.prediction_type 'v_prediction' "
                             f"(at zero SNR an epsilon prediction says nothing of the image), got "
                             f"'{self.prediction_type}'")
        if self.zero_terminal_snr and self.snr_gamma is not None:
            raise InputError("config key 'options.zero_terminal_snr' needs options.snr_gamma none: min-SNR weighting "
                             "gives the zero-SNR step, where the layout is decided, no weight")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise InputError(f"config key 'options.timestep_sampling' must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got '{self.timestep_sampling}'")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise InputError(f"config key 'options.caption_dropout' must be in [0, 1], got {self.caption_dropout}")
        if self.grounding_weight < 0:
            raise InputError(f"config key 'options.grounding_weight' must be >= 0, got {self.grounding_weight}")
        if self.relation_contrast_weight < 0 or self.relation_contrast_margin < 0:
            raise InputError(f"config keys 'options.relation_contrast_weight' and 'options.relation_contrast_margin' "
                             f"must be >= 0, got {self.relation_contrast_weight} and {self.relation_contrast_margin}")
        if self.relation_contrast_min_t < 0:
            raise InputError(f"config key 'options.relation_contrast_min_t' must be >= 0, "
                             f"got {self.relation_contrast_min_t}")
        if self.text_encoder and not self.base:
            raise InputError("config key 'options.text_encoder' replaces the text side of 'options.base'; without a "
                             "base, options.clip names the text encoder")  # fmt: skip
        if self.text_encoder_lr is not None and (not self.train_text_encoder or self.text_encoder_lr <= 0):
            raise InputError(f"config key 'options.text_encoder_lr' must be > 0 and needs options.train_text_encoder: "
                             f"true, got {self.text_encoder_lr}")  # fmt: skip
        if self.text_encoder_init not in TEXT_ENCODER_INITS:
            raise InputError(f"config key 'options.text_encoder_init' must be one of {', '.join(TEXT_ENCODER_INITS)}, "
                             f"got '{self.text_encoder_init}'")  # fmt: skip
        if self.text_encoder_init == "random" and not self.train_text_encoder:
            raise InputError("config key 'options.text_encoder_init: random' needs options.train_text_encoder: true "
                             "(a random text encoder that stays frozen conditions on noise)")  # fmt: skip
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise InputError(f"config key 'options.snr_gamma' must be > 0 or none, got {self.snr_gamma}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")
        if any(not 1 <= d <= MAX_DEPTH for d in self.attention_depth):  # before the models load; the per-level
            # count and no-shrink checks need the UNet and run in deepen_attention
            raise InputError(f"config key 'options.attention_depth' takes counts 1..{MAX_DEPTH}, "
                             f"got {list(self.attention_depth)}")
        if self.sample_steps <= 0 or self.sample_cfg < 0:
            raise InputError("config keys 'options.sample_steps' must be > 0 and 'options.sample_cfg' >= 0")


class TextToImageRecipe(Recipe):
    name = "t2i"
    Options = TextToImageOptions
    description = "latent diffusion UNet on frozen VAE latents and frozen CLIP text (caption dropout for CFG)"
    trains_on_latents = True
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 64, "lr": 5e-4, "warmup_steps": 200}

    # ---------------------------------------------------------------- set-up
    def build(self) -> None:
        o = self.options
        if o.base:
            b = Bundle.from_pretrained(o.base, load_clip=True)
            tokenizer, text_encoder, vae, unet, scheduler, clip = (
                b.tokenizer, b.text_encoder, b.vae, b.unet, b.scheduler, b.clip,
            )  # fmt: skip
            if o.text_encoder:
                tokenizer, text_encoder, clip = self.text_side(o.text_encoder, unet)
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
        if o.text_encoder_init == "random":
            text_encoder, clip = type(text_encoder)(text_encoder.config), None
        if o.attention_depth:
            unet = deepen_attention(unet, o.attention_depth, where="options.attention_depth")
        self.tokenizer, self.clip = tokenizer, clip
        self.scheduler = scheduler
        self.scheduler.register_to_config(prediction_type=o.prediction_type)
        if scheduler.config.get("rescale_betas_zero_snr", False) and not o.zero_terminal_snr:
            raise InputError(f"options.base ({o.base}) samples with zero terminal SNR; set options.zero_terminal_snr "
                             "true (with options.prediction_type v_prediction, options.snr_gamma none) to train it on")
        if o.zero_terminal_snr:  # rebuilt, because the betas are computed when a scheduler is made
            self.scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True,
                                                         timestep_spacing="trailing")  # fmt: skip
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        self.models = {"text_encoder": text_encoder, "vae": vae, "unet": unet}
        self.trainable = ("unet", "text_encoder") if o.train_text_encoder else ("unet",)
        self.recorder = CrossAttentionRecorder(unet) if o.grounding_weight > 0 else None

    @staticmethod
    def text_side(folder: str, unet: torch.nn.Module) -> tuple[Any, Any, Any]:
        """Tokenizer, text encoder and CLIP (None if absent) of `folder`, checked against the UNet's
        cross-attention width."""
        text_encoder = load_component(folder, "text_encoder")
        width, expected = int(text_encoder.config.hidden_size), unet.config.cross_attention_dim
        if width != expected:
            raise InputError(f"options.text_encoder ('{folder}') gives {width}-wide hidden states; the UNet of "
                             f"options.base cross-attends to {expected}")  # fmt: skip
        clip = load_component(folder, CLIP_FOLDER) if (Path(folder) / CLIP_FOLDER).is_dir() else None
        return load_component(folder, "tokenizer"), text_encoder, clip

    def started(self, step: int) -> None:
        """Copy the base's model card into the run folder as it was when the run began (kept on --resume).

        scripts/ship_zoo.py adds the steps that card gives to the run's own; the base is often the bundle the run
        is reshipped over, whose card by then already counts the run.
        """
        if not self.options.base:
            return
        card, kept = Path(self.options.base) / "README.md", Path(self.config.out) / BASE_CARD
        if card.is_file() and (step == 0 or not kept.exists()):
            write_text(card.read_text(encoding="utf-8"), kept)

    def _unet(self) -> torch.nn.Module:
        unet = self.models["unet"]
        return getattr(unet, "module", unet)

    def _text_encoder(self) -> torch.nn.Module:
        text_encoder = self.models["text_encoder"]
        return getattr(text_encoder, "module", text_encoder)  # unwrapped from DDP when it trains

    @property
    def resolution(self) -> int:
        vae = self.models["vae"]
        size = self._unet().config.sample_size
        return int(size if isinstance(size, int) else size[0]) * 2 ** (len(vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- pieces a subclass may reuse
    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace a `caption_dropout` fraction by "" so the model also learns the unconditional branch."""
        keep = torch.rand(len(captions)) >= self.options.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def tokenize(self, captions: list[str], **extra: Any) -> Any:
        """The captions padded to the tokenizer's max length, as diffusers' pipelines tokenise prompts."""
        return tokenize_padded(self.tokenizer, captions, **extra)

    def parameters(self) -> list[dict[str, Any]]:
        """One group per trainable module, so a trained text encoder may take its own learning rate."""
        groups = [{"params": [p for p in self.models["unet"].parameters() if p.requires_grad]}]
        if "text_encoder" in self.trainable:
            group: dict[str, Any] = {"params": [p for p in self.models["text_encoder"].parameters() if p.requires_grad]}
            if self.options.text_encoder_lr is not None:
                group["lr"] = self.options.text_encoder_lr
            groups.append(group)
        return groups

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states (with gradients only when it trains)."""
        ids = self.tokenize(captions, return_tensors="pt").input_ids.to(self.device)
        with torch.set_grad_enabled("text_encoder" in self.trainable and torch.is_grad_enabled()):
            return self.models["text_encoder"](ids)[0]

    def dataset(self) -> Dataset:
        examples = super().dataset()
        if isinstance(examples, LatentCacheExamples):
            examples.check_vae(self.models["vae"], where=f"options.vae ('{self.options.vae}')")
            if self.recorder is not None:
                raise InputError(
                    f"options.grounding_weight needs each example's scene for its masks; the latent cache "
                    f"'{self.config.data}' keeps none: use data: shapes or an imagefolder export"
                )
        return examples

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

    def draw_timesteps(self, n: int) -> torch.Tensor:
        """Uniform over the training schedule, or T2I-Adapter's cubic schedule (options.timestep_sampling)."""
        steps = int(self.noise_scheduler.config.num_train_timesteps)
        if self.options.timestep_sampling == "cubic":
            u = torch.rand(n, device=self.device)
            return ((1.0 - u**3) * steps).long().clamp(0, steps - 1)
        return torch.randint(0, steps, (n,), device=self.device).long()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.options.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    @staticmethod
    def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each example's mean squared error."""
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def denoising_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                       per_sample: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """MSE, optionally min-SNR-gamma weighted (Hang et al. 2023), per sample then averaged."""
        if per_sample is None:
            per_sample = self.per_sample_error(pred, target)
        if self.options.snr_gamma is None:
            return per_sample.mean()
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.options.snr_gamma)
        weight = clipped / (snr + 1) if self.options.prediction_type == "v_prediction" else clipped / snr
        return (per_sample * weight).mean()

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, batch: dict[str, Any]):
        """The network's prediction; control recipes add their residuals here."""
        return self.models["unet"](noisy, timesteps, encoder_hidden_states=text).sample

    # ---------------------------------------------------------------- the step
    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        latents = self.latents(batch)
        captions = self.drop_captions(list(batch["caption"]))
        text = self.encode_text(captions)
        noise = torch.randn_like(latents)
        timesteps = self.draw_timesteps(latents.shape[0])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.recorder.record() if self.recorder else nullcontext([]) as maps:
            pred = self.predict(noisy, timesteps, text, batch)
        target = self.target(latents, noise, timesteps)
        per_sample = self.per_sample_error(pred, target)
        loss = denoising = self.denoising_loss(pred, target, timesteps, per_sample)
        logs: dict[str, float] = {}
        if self.recorder is not None:
            grounding = token_grounding_loss(maps, *self.token_masks(captions, batch.get("scene")))
            loss = loss + self.options.grounding_weight * grounding
            logs["grounding"] = float(grounding.detach())
        if self.options.relation_contrast_weight > 0:
            contrast, contrast_logs = self.relation_contrast(captions, noisy, timesteps, target, per_sample, batch)
            loss = loss + self.options.relation_contrast_weight * contrast
            logs.update(contrast_logs)
        if logs:
            logs["denoising"] = float(denoising.detach())
        return loss, logs

    def relation_contrast(self, captions: list[str], noisy: torch.Tensor, timesteps: torch.Tensor,
                          target: torch.Tensor, per_true: torch.Tensor, batch: dict[str, Any],
                          ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """Hinge on the relative loss gap between each relation caption and its flip (NegCLIP's hard negatives,
        scored by the denoising loss as a diffusion classifier scores a caption): mean relu(margin - gap), where
        gap = (loss(flipped) - loss(true)) / loss(true). Logs the mean gap and the fraction the true caption wins."""
        o = self.options
        flipped = [flip_relations(c) if c else None for c in captions]
        keep = [i for i, f in enumerate(flipped) if f is not None and int(timesteps[i]) >= o.relation_contrast_min_t]
        if not keep:
            return per_true.sum() * 0.0, {}
        idx = torch.tensor(keep, device=noisy.device)
        sub = {k: v[idx.to(v.device)] if torch.is_tensor(v) else [v[i] for i in keep] for k, v in batch.items()}
        text = self.encode_text([flipped[i] for i in keep])  # type: ignore[misc]
        per_flip = self.per_sample_error(self.predict(noisy[idx], timesteps[idx], text, sub), target[idx])
        true = per_true[idx]
        gap = (per_flip - true) / true.detach().clamp_min(1e-8)
        contrast = F.relu(o.relation_contrast_margin - gap).mean()
        return contrast, {"relation_contrast": float(contrast.detach()), "relation_gap": float(gap.detach().mean()),
                          "relation_wins": float((gap.detach() > 0).float().mean())}  # fmt: skip

    def token_masks(self, captions: list[str], scenes: list[Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's group masks and each text token's group (-1: none), as `encode_text` tokenizes."""
        offsets = self.tokenize(captions, return_offsets_mapping=True).offset_mapping
        return token_groups(captions, scenes or [None] * len(captions), offsets)

    # ---------------------------------------------------------------- viewing and export
    def bundle(self) -> Bundle:
        return Bundle(
            tokenizer=self.tokenizer,
            text_encoder=self._text_encoder(),
            vae=self.models["vae"],
            unet=self._unet(),
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
