"""GLIGEN (Li et al. 2023): grounding tokens (a phrase's pooled text embedding with its box's Fourier embedding)
read by gated self-attention layers added to every transformer block of a frozen text-to-image UNet.

The network is the base UNet rebuilt with diffusers' `attention_type="gated"` (`models.zoo.build_gligen_unet`):
the base weights frozen, the gated layers (`*.fuser.*`) and the box/phrase projection (`position_net`) trained, the
gates starting at 0 so step 0 predicts what the base does. On Shapes every object of the scene is one grounding
token: its full box (`ShapeObject.box`) and its phrase ("red circle", `ShapeObject.phrase`), up to 30 per image,
padded with the learned null. Conditions drop as classifier-free guidance needs them: `caption_dropout` of the
captions become "", and `grounding_dropout` of the images lose all their grounding tokens (slot masks 0, the null),
which is what the unconditional branch gives at sampling (diffusers' GLIGEN pipeline). `gate_lr_scale` multiplies
the gates' learning rate (1, the paper's; 10 bought nothing measurable: docs/experiments/layout.md).

Export: `RUN/final/gligen`, only the layers the base lacks (fp16, `models.components.save_layers`); the progress
grid is drawn by diffusers' own `StableDiffusionGLIGENPipeline` (layout | output | source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle
from mmsynth.models.components import apply_layers, save_layers
from mmsynth.models.zoo import build_gligen_unet
from mmsynth.sample.gligen import phrase_embeddings
from mmsynth.sample.layout import MAX_BOXES, scene_layout
from mmsynth.train.denoising import DenoisingOptions, DenoisingRecipe
from mmsynth.train.recipes.t2i import SAVE_DTYPES

COMPONENT = "gligen"


@dataclass
class GligenOptions(DenoisingOptions):
    base: str = "models/shapes-v1"  # the frozen text-to-image bundle the grounding layers are trained for
    init: str | None = None  # a trained GLIGEN folder (RUN/final/gligen, layers over options.base) to start from
    caption_dropout: float = 0.5  # captions emptied: the boxes alone must then say what goes where
    grounding_dropout: float = 0.1  # images whose grounding tokens are all the null (the unconditional branch)
    gate_lr_scale: float = 1.0  # the gates' learning rate over the rest's (1: the paper's)
    sample_scenes: int = 4
    sample_steps: int = 25
    sample_cfg: float = 4.0
    save_dtype: str = "float16"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.grounding_dropout <= 1.0:
            raise InputError(f"config key 'options.grounding_dropout' must be in [0, 1], got {self.grounding_dropout}")
        if not self.gate_lr_scale > 0:
            raise InputError(f"config key 'options.gate_lr_scale' must be > 0, got {self.gate_lr_scale}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")
        if self.sample_scenes <= 0 or self.sample_steps <= 0 or self.sample_cfg < 0:
            raise InputError("config keys 'options.sample_scenes' and 'options.sample_steps' must be > 0 and "
                             "'options.sample_cfg' >= 0")  # fmt: skip


def is_grounding_parameter(name: str) -> bool:
    """The parameters GLIGEN adds to a UNet (what trains and what is shipped)."""
    return name.startswith("position_net.") or ".fuser." in name


class GligenRecipe(DenoisingRecipe):
    name = "gligen"
    Options = GligenOptions
    description = "GLIGEN gated self-attention over box + phrase tokens, on a frozen text-to-image bundle"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 16, "lr": 1e-4, "warmup_steps": 0, "lr_schedule": "constant"}

    def build(self) -> None:
        o = self.options
        b = Bundle.from_pretrained(o.base)
        self.base_bundle = b
        self.tokenizer = b.tokenizer
        self.set_scheduler(b.scheduler)
        unet = build_gligen_unet(b.unet)
        if o.init:  # the trained layers over this base
            apply_layers(unet, o.init, b.unet.state_dict(), f"options.init ('{o.init}')")
        self.models = {"text_encoder": b.text_encoder, "vae": b.vae, "unet": unet}
        self.trainable = ("unet",)
        self._phrases: dict[str, torch.Tensor] = {}

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().place(device, weight_dtype)
        for name, p in self.models["unet"].named_parameters():
            p.requires_grad_(is_grounding_parameter(name))

    def parameter_groups(self) -> list[dict[str, Any]]:
        named = [(n, p) for n, p in self.models["unet"].named_parameters() if p.requires_grad]
        gates = [p for n, p in named if n.endswith(("alpha_attn", "alpha_dense"))]
        rest = [p for n, p in named if not n.endswith(("alpha_attn", "alpha_dense"))]
        return [{"params": rest}, {"params": gates, "lr": self.config.lr * self.options.gate_lr_scale}]

    # ---------------------------------------------------------------- conditions
    def phrase_embedding(self, phrase: str) -> torch.Tensor:
        """The phrase's pooled text embedding (as the sampler's GLIGEN control encodes it), cached: Shapes has 40."""
        if phrase not in self._phrases:
            self._phrases[phrase] = phrase_embeddings(self.tokenizer, self.models["text_encoder"], [phrase])[0].float()
        return self._phrases[phrase]

    def grounding(self, scenes: list[Any]) -> dict[str, torch.Tensor]:
        """cross_attention_kwargs["gligen"] of a batch: boxes, phrase embeddings and slot masks (grounding dropout:
        whole images at mask 0)."""
        n, dim = len(scenes), int(self.unwrapped("unet").config.cross_attention_dim)
        boxes, embeddings, masks = torch.zeros(n, MAX_BOXES, 4), torch.zeros(n, MAX_BOXES, dim), torch.zeros(n,
                                                                                                          MAX_BOXES)
        keep = (torch.rand(n) >= self.options.grounding_dropout).tolist()
        for i, scene in enumerate(scenes):
            if scene is None or not keep[i]:
                continue
            layout = scene_layout(scene)
            b, p = layout.boxes, layout.phrases
            boxes[i, :len(b)] = torch.tensor(b)
            embeddings[i, :len(p)] = torch.stack([self.phrase_embedding(x).cpu() for x in p])
            masks[i, :len(b)] = 1
        return {k: v.to(self.device) for k, v in
                {"boxes": boxes, "positive_embeddings": embeddings, "masks": masks}.items()}  # fmt: skip

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        scenes = batch.get("scene")
        if scenes is None:
            raise InputError("recipe 'gligen' trains on Shapes scenes (their boxes and phrases): config key 'data' "
                             "must be 'shapes'")
        return {**super().condition(batch), "cross_attention_kwargs": {"gligen": self.grounding(list(scenes))}}

    # ---------------------------------------------------------------- viewing and export
    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Test-split scenes: the layout | GLIGEN's output under the scene's caption and boxes | the source render,
        drawn by diffusers' StableDiffusionGLIGENPipeline (grounding on every step, DDIM, seed i for scene i)."""
        from diffusers import StableDiffusionGLIGENPipeline

        from mmsynth.annotate.layout import layout as draw_layout
        from mmsynth.data.captions import captions
        from mmsynth.data.render import render
        from mmsynth.data.scene import sample_scene
        from mmsynth.viz import grid, label

        unet = self.unwrapped("unet")
        was_training = unet.training
        unet.eval()
        pipe = StableDiffusionGLIGENPipeline(
            vae=self.models["vae"], text_encoder=self.models["text_encoder"], tokenizer=self.tokenizer, unet=unet,
            scheduler=type(self.scheduler).from_config(self.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        r, tiles = self.resolution, []
        for i in range(self.options.sample_scenes):
            scene = sample_scene("test", i)
            layout = scene_layout(scene)
            boxes, phrases = layout.boxes, layout.phrases
            prompt = captions(scene, 1)[0]
            out = pipe(prompt, gligen_phrases=phrases, gligen_boxes=boxes, gligen_scheduled_sampling_beta=1.0,
                       height=r, width=r, num_inference_steps=self.options.sample_steps,
                       guidance_scale=self.options.sample_cfg, generator=torch.Generator().manual_seed(i),
                       output_type="np").images[0]  # fmt: skip
            shown = draw_layout(np.zeros((r, r, 3), np.uint8), boxes, phrases, 1, False, "black")
            tiles += [label(shown, "layout", height=10),
                      label((out * 255).round().astype(np.uint8), prompt, height=10),
                      label(render(scene, r), "source", height=10)]
        unet.train(was_training)
        return grid(tiles, cols=3)

    def export(self, out: Path) -> Path:
        """OUT/gligen/: the grounding layers over the base's unet/ (config + the weights the base lacks)."""
        out.mkdir(parents=True, exist_ok=True)
        save_layers(self.unwrapped("unet"), self.base_bundle.unet, out / COMPONENT, "unet",
                    dtype=SAVE_DTYPES[self.options.save_dtype])  # fmt: skip
        return out
