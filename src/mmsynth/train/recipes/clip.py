"""Contrastive CLIP on Shapes image/caption pairs (the zoo's text encoder and image features).

The text tower becomes the diffusion model's text encoder; the vision tower later serves exemplar
conditions, CLIP score and a Frechet feature extractor. Loss: CLIPModel's own symmetric InfoNCE. The zoo's
later stages keep the text tower fixed (`freeze_text`), grow the vision tower (`vision_layers`, `vision_patch`)
and pair each scene with a minimal edit of itself (`hard_negatives`); options tried and not shipped are in
docs/experiments/training-options.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmsynth.data.scene import EDIT_KINDS
from mmsynth.errors import InputError
from mmsynth.models.bundle import load_component, save_components
from mmsynth.models.grow import deepen_vision_tower, refine_vision_patches
from mmsynth.models.tokenizer import build_shapes_tokenizer
from mmsynth.models.zoo import ZOO_SPECS, build_clip, text_encoder_from_clip
from mmsynth.train.data import HardNegativePairs
from mmsynth.train.recipe import Recipe


@dataclass
class ClipOptions:
    zoo: str = "shapes-v1"  # size of a fresh model (mmsynth.models.zoo.ZOO_SPECS)
    init: str | None = None  # continue from a folder with clip/ + tokenizer/ (e.g. an earlier run's final/)
    # Keep the text tower (and its projection) fixed and train only the vision side and the temperature: the
    # text tower is the diffusion UNet's text encoder, so this improves retrieval without invalidating a
    # UNet already trained on it (LiT, Zhai et al. 2022, with the roles swapped).
    freeze_text: bool = False
    # Pair every scene of a batch with a minimal edit of itself (one object's shape or colour changed): the
    # retrieval errors left are near misses of exactly that kind, which random in-batch negatives rarely are
    # (hard negatives as in NegCLIP, Yuksekgonul et al. 2023, here on the image side). Needs data: shapes.
    hard_negatives: bool = False
    # What a hard negative's edit may change: some of "shape", "colour", "count", "place" (data.scene.EDIT_KINDS)
    hard_negative_edits: tuple[str, ...] = ("shape", "colour")
    # Grow init's vision tower to this many encoder layers (models/grow.py: the new layers start as identities);
    # 0 keeps it. The zoo's third and sixth stages (configs/clip_vision_deep.yaml, clip_vision_8l.yaml).
    vision_layers: int = 0
    # Cut images into patches of this size (a divisor of init's patch size; models/grow.py starts the finer
    # tower where init's would stand on an image upsampled to match); 0 keeps it (configs/clip_vision_patch4.yaml).
    vision_patch: int = 0

    def validate(self) -> None:
        if self.zoo not in ZOO_SPECS:
            raise InputError(f"config key 'options.zoo' must be one of {', '.join(ZOO_SPECS)}, got '{self.zoo}'")
        if not self.hard_negative_edits or set(self.hard_negative_edits) - set(EDIT_KINDS):
            raise InputError(f"config key 'options.hard_negative_edits' takes some of {', '.join(EDIT_KINDS)}, "
                             f"got {list(self.hard_negative_edits)}")  # fmt: skip
        for key in ("vision_layers", "vision_patch"):
            if getattr(self, key) < 0:
                raise InputError(f"config key 'options.{key}' must be >= 0 (0 keeps the tower), "
                                 f"got {getattr(self, key)}")  # fmt: skip
        if self.freeze_text and not self.init:
            raise InputError("config key 'options.freeze_text' needs 'options.init' (a trained text tower to keep)")
        for key, verb in (("vision_layers", "grows"), ("vision_patch", "refines")):
            if getattr(self, key) and not self.init:
                raise InputError(f"config key 'options.{key}' {verb} the vision tower of 'options.init'; a fresh "
                                 "model takes its size from 'options.zoo'")  # fmt: skip


class ClipRecipe(Recipe):
    name = "clip"
    Options = ClipOptions
    description = "contrastive CLIP (text + vision towers) on Shapes image/caption pairs"
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 128,
        "lr": 5e-4,
        "weight_decay": 0.1,
        "adam_beta2": 0.98,
        "warmup_steps": 200,
    }

    def build(self) -> None:
        o = self.options
        if o.init:
            self.tokenizer = load_component(o.init, "tokenizer")
            clip = load_component(o.init, "clip")
            if o.vision_layers:
                clip = deepen_vision_tower(clip, o.vision_layers, where="config key 'options.vision_layers'")
            if o.vision_patch:
                clip = refine_vision_patches(clip, o.vision_patch, where="config key 'options.vision_patch'")
        else:
            spec = ZOO_SPECS[o.zoo]
            self.tokenizer = build_shapes_tokenizer(spec.max_length)
            clip = build_clip(spec, self.tokenizer)
        self.models = {"clip": clip}
        self.trainable = ("clip",)

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().place(device, weight_dtype)
        if self.options.freeze_text:  # out of the optimiser: Recipe.parameter_groups keeps requires_grad ones
            clip = self.models["clip"]
            for part in (clip.text_model, clip.text_projection):
                part.requires_grad_(False)
            clip.text_model.eval()

    def dataset(self) -> Dataset:
        c = self.config
        if not self.options.hard_negatives:
            return super().dataset()
        if c.data != "shapes":
            raise InputError(f"config key 'options.hard_negatives' edits Shapes scenes, so it needs data: shapes, "
                             f"got data: {c.data}")  # fmt: skip
        if c.batch_size % 2:
            raise InputError(f"config key 'options.hard_negatives' puts a scene and its edit in one batch, so "
                             f"batch_size must be even, got {c.batch_size}")  # fmt: skip
        return HardNegativePairs(c.data_split, c.data_seed, self.resolution, kinds=self.options.hard_negative_edits)

    @property
    def resolution(self) -> int:
        return int(self.unwrapped("clip").config.vision_config.image_size)

    def tokenize(self, texts: list[str], **extra: Any) -> Any:
        """Pad to the longest caption of the batch: under CLIP's causal mask the pooled end-of-text
        output never sees later padding, so this equals max-length padding at a fraction of the cost."""
        return self.tokenizer(texts, padding="longest", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt", **extra)  # fmt: skip

    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """CLIP's symmetric InfoNCE, and the in-batch text->image retrieval accuracy."""
        captions = list(batch["caption"])
        input_ids = self.tokenize(captions).input_ids.to(self.device)
        out = self.models["clip"](input_ids=input_ids, pixel_values=batch["pixel_values"])
        target = torch.arange(len(captions), device=out.logits_per_image.device)
        loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        with torch.no_grad():  # identical captions in a batch count as matches
            pred = out.logits_per_text.argmax(dim=1)
            same = [captions[int(j)] == captions[i] for i, j in enumerate(pred)]
        logs = {"logit_scale": float(self.unwrapped("clip").logit_scale.detach().exp()),
                "t2i_top1_in_batch": sum(same) / len(same)}  # fmt: skip
        return loss, logs

    def export(self, out: Path) -> Path:
        clip = self.unwrapped("clip")
        return save_components(out, tokenizer=self.tokenizer, text_encoder=text_encoder_from_clip(clip), clip=clip)
