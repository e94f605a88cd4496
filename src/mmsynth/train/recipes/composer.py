"""Composer (Huang et al. 2023) in miniature: fine-tune a text-to-image UNet to generate from any subset of an image's
own representations (self-supervised: each training image is decomposed into its conditions).

Each batch carries the Shapes scene's maps (train/conditions.py: XDoG sketch, the exact segmentation and depth,
intensity) and its CIELab histogram; the recipe adds the masked image (a random box hidden, with its mask) and the
zoo CLIP's image embedding. Condition dropout as the paper: each condition dropped with 0.5, intensity with 0.7
(it carries most of the image), all dropped with 0.1 and all kept with 0.1; the caption (words and pooled
embedding) is one of the conditions. A dropped condition is its null (models/composer.py).
The UNet (`composer_unet`: the base's, with zero-initialised extra input channels and class embedding) and the
conditioner train (with `lora_rank` > 0, the default, the UNet as a LoRA on its attention plus its new layers in
full, which ships within the zoo's weight budget); text encoder, VAE and CLIP stay frozen. Export: RUN/final/, the
base bundle with the components `composer_unet` (layers and LoRA over unet/) and `composer` (what the `composer`
control and `mmsynth compose` use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmsynth.annotate.color import HISTOGRAM_SIZE
from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle, add_components
from mmsynth.models.composer import LOCAL_CONDITIONS, ComposerConditioner, composer_unet
from mmsynth.models.zoo import image_features
from mmsynth.sample.composer import ANNOTATORS, COMPOSER, COMPOSER_UNET
from mmsynth.train.denoising import DenoisingOptions, DenoisingRecipe, add_lora, train_only
from mmsynth.train.recipe import evaluating
from mmsynth.train.recipes.t2i import SAVE_DTYPES

MAPS = dict(ANNOTATORS)  # representation -> the batch's key for it (annotate's kind, which the data path supplies)
SAMPLE_SCENES = 4


@dataclass
class ComposerOptions(DenoisingOptions):
    base: str = "models/shapes-v1"  # the text-to-image bundle whose UNet is extended (with clip/ for the image)
    drop: float = 0.5  # each condition dropped with this probability
    drop_intensity: float = 0.7
    drop_all: float = 0.1
    keep_all: float = 0.1
    tokens_per_condition: int = 4
    lora_rank: int = 8  # > 0: a LoRA on the UNet's attention, its new input and class layers in full; 0: all
    sample_steps: int = 25
    sample_cfg: float = 3.0
    save_dtype: str = "float16"

    def validate(self) -> None:
        super().validate()
        for key in ("drop", "drop_intensity", "drop_all", "keep_all"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise InputError(f"config key 'options.{key}' must be in [0, 1], got {getattr(self, key)}")
        if self.drop_all + self.keep_all > 1.0:
            raise InputError("config keys 'options.drop_all' + 'options.keep_all' must be at most 1")
        if self.tokens_per_condition < 1:
            raise InputError("config key 'options.tokens_per_condition' must be >= 1")
        if self.lora_rank < 0:
            raise InputError(f"config key 'options.lora_rank' must be >= 0 (0: the whole UNet), got {self.lora_rank}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")


class ComposerRecipe(DenoisingRecipe):
    name = "composer"
    Options = ComposerOptions
    description = "Composer: a UNet generating from any subset of an image's representations (fine-tuned)"
    trains_on_latents = False  # the conditions come from the pixels and the scene every step
    conditions: ClassVar[tuple[str, ...]] = (*MAPS.values(), "histogram")
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 16, "lr": 1e-4, "warmup_steps": 100}

    def build(self) -> None:
        o = self.options
        b = Bundle.from_pretrained(o.base, load_clip=True)
        if b.clip is None:
            raise InputError(f"options.base '{o.base}' has no clip/: the image embedding is its CLIP's")
        self.base_bundle, self.tokenizer, self.clip = b, b.tokenizer, b.clip
        text_dim = int(b.text_encoder.config.hidden_size)
        image_dim = int(b.clip.config.projection_dim)
        net = ComposerConditioner(global_conditions={"caption": text_dim, "image": image_dim,
                                                     "histogram": HISTOGRAM_SIZE},
                                  out_channels=int(b.unet.config.in_channels), factor=b.vae_scale_factor,
                                  context_dim=int(b.unet.config.cross_attention_dim),
                                  tokens_per_condition=o.tokens_per_condition)  # fmt: skip
        unet = composer_unet(b.unet, int(net.config.out_channels), net.global_dim)
        if o.lora_rank:
            add_lora(unet, o.lora_rank)
        self.set_scheduler(b.scheduler)
        self.models = {"text_encoder": b.text_encoder, "vae": b.vae, "clip": b.clip, "unet": unet,
                       "conditioner": net}  # fmt: skip
        self.trainable = ("unet", "conditioner")

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().place(device, weight_dtype)
        if self.options.lora_rank:  # the new layers train in full, the rest of the UNet through its LoRA
            train_only(self.unwrapped("unet"), ("conv_in.", "class_embedding."))

    # ---------------------------------------------------------------- conditions
    def drop_conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Which conditions each example keeps (the paper's schedule); a dropped caption becomes ""."""
        o, n = self.options, len(batch["caption"])
        names = [*LOCAL_CONDITIONS, "image", "histogram", "caption"]
        keep = {name: (torch.rand(n) >= (o.drop_intensity if name == "intensity" else o.drop)) for name in names}
        u = torch.rand(n)
        for name in names:
            keep[name] = torch.where(u < o.drop_all, False, torch.where(u < o.drop_all + o.keep_all, True,
                                                                        keep[name]))
        captions = [c if k else "" for c, k in zip(batch["caption"], keep["caption"].tolist())]
        return {**batch, "caption": captions, "keep": keep}

    def masked_image(self, pixels: torch.Tensor, index: list[int]) -> torch.Tensor:
        """Each image with a random box hidden (reproducible from its index and the seed), and the mask: n x 4."""
        n, _, h, w = pixels.shape
        mask = torch.zeros(n, 1, h, w, device=pixels.device)
        for i, k in enumerate(index):
            rng = np.random.default_rng([self.config.seed, int(k), 0xC0])
            bw, bh = (int(v * s) for v, s in zip(rng.uniform(0.2, 0.6, size=2), (w, h)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            mask[i, :, y0: y0 + bh, x0: x0 + bw] = 1
        image01 = (pixels + 1) / 2
        return torch.cat([image01 * (1 - mask), mask], dim=1)

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        keep = batch["keep"]
        pixels = batch["pixel_values"].to(self.device)
        n = pixels.shape[0]
        net = self.models["conditioner"]

        def kept(name: str, value: torch.Tensor) -> torch.Tensor:
            return value * keep[name].to(value.device, value.dtype).reshape(-1, *[1] * (value.ndim - 1))

        maps = {name: kept(name, batch[kind].to(self.device).float()) for name, kind in MAPS.items()}
        maps["masked_image"] = kept("masked_image", self.masked_image(pixels.float(), list(batch["index"])))
        for name, value in maps.items():  # a 3-channel map where the encoder takes 1 (or the reverse)
            want = LOCAL_CONDITIONS[name]
            if value.shape[1] != want:
                maps[name] = value.mean(dim=1, keepdim=True) if want == 1 else value.expand(-1, want, -1, -1)
        with torch.no_grad():
            image = image_features(self.models["clip"], pixels.to(self.weight_dtype)).float()
            context = self.encode_text(list(batch["caption"]))
            ids = self.tokenize(list(batch["caption"]), return_tensors="pt").input_ids.to(self.device)
            pooled = self.models["text_encoder"](ids).pooler_output.float()
        vectors = {"image": kept("image", image), "histogram": kept("histogram", batch["histogram"].to(self.device)
                                                                     .float()),
                   "caption": kept("caption", pooled)}  # fmt: skip
        latent = pixels.shape[-1] // self.base_bundle.vae_scale_factor
        local = net.local_channels(maps, n, (latent, latent))
        tokens = net.tokens(vectors, n)
        return {"encoder_hidden_states": torch.cat([context, tokens.to(context.dtype)], dim=1),
                "class_labels": net.global_vector(vectors, n), "channels": local}

    # ---------------------------------------------------------------- viewing and export
    def bundle(self) -> Bundle:
        b = Bundle.from_pretrained(self.options.base)
        b.extras[COMPOSER_UNET] = self.unwrapped("unet")
        b.extras[COMPOSER] = self.unwrapped("conditioner")
        return b

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Test-split scenes: the source | from its sketch alone | sketch + another scene's colours | the other."""
        from mmsynth.data.captions import captions
        from mmsynth.data.render import render
        from mmsynth.data.scene import sample_scene
        from mmsynth.sample import Composer, GenerationRequest, sample
        from mmsynth.sample.composer import decompose
        from mmsynth.viz import grid, label

        b = self.bundle()
        r, tiles = self.resolution, []
        with evaluating(b.extras[COMPOSER_UNET], b.extras[COMPOSER]):
            for i in range(SAMPLE_SCENES):
                a, other = sample_scene("test", 2 * i), sample_scene("test", 2 * i + 1)
                image_a, image_b = render(a, r), render(other, r)
                sketch = decompose(b, image_a, ["sketch"])
                colours = decompose(b, image_b, ["histogram"])
                request = GenerationRequest(prompt=captions(a, 1)[0], n=1, seed=i, steps=self.options.sample_steps,
                                            cfg=self.options.sample_cfg)  # fmt: skip
                alone = sample(b, request, [Composer(conditions=sketch)], progress=False).images[0]
                mixed = sample(b, request, [Composer(conditions={**sketch, **colours})], progress=False).images[0]
                tiles += [label(image_a, "A", height=10), label(alone, "A's sketch", height=10),
                          label(mixed, "+ B's colours", height=10), label(image_b, "B", height=10)]
        return grid(tiles, cols=4)

    def export(self, out: Path) -> Path:
        """OUT/: the base bundle with `composer_unet` (the layers and LoRA it adds to unet/) and `composer`."""
        dtype = SAVE_DTYPES[self.options.save_dtype]
        self.base_bundle.save_pretrained(out, dtype=dtype)
        add_components(out, dtype, layered={COMPOSER_UNET: (self.unwrapped("unet"), self.base_bundle.unet, "unet")},
                       whole={COMPOSER: self.unwrapped("conditioner")})
        return out
