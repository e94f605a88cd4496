"""What ControlNet and T2I-Adapter training share: a frozen text-to-image bundle, one trainable control network
fed one condition map, and its export alone in its library's format.

The base bundle (`options.base`: UNet, VAE, text encoder) never trains; the control network starts fresh from
the base (`fresh_control`) or from a trained one (`options.init`, a new run), and is the only module the
optimiser gets. Each batch carries the map `options.condition` (train/conditions.py: exact from the Shapes spec
for segmentation and depth, an annotator on the render for canny, xdog, lineart, palette, ...) as N x C x H x W
in [0, 1] at image resolution, and the network sees it as `control_image` makes it: C must equal its input
channels, except that a 1-channel map is repeated to 3 (what diffusers' ControlNet pipeline does to a grey
control image). The denoising story (latents, dropout, timesteps, loss) is DenoisingRecipe's; a subclass says
how its network's output enters the UNet (`residuals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle, save_components
from mmsynth.train.conditions import check_conditions, condition_channels, prepared
from mmsynth.train.denoising import DenoisingOptions, DenoisingRecipe
from mmsynth.train.recipes.t2i import SAVE_DTYPES
from mmsynth.viz import grid, label


@dataclass
class ControlOptions(DenoisingOptions):
    base: str = "models/shapes-v1"  # the frozen text-to-image bundle the control is trained for
    condition: str = "canny"  # the condition map (train/conditions.py; `mmsynth annotate --help` lists kinds)
    conditioning_channels: int = 3  # channels of the network's condition input; a 1-channel map is repeated to 3
    init: str | None = None  # a trained control folder (e.g. RUN/final/controlnet) to start from: a new run
    sample_scenes: int = 4  # test-split scenes in the progress grid (condition | output | source)
    sample_steps: int = 25
    sample_cfg: float = 4.0
    save_dtype: str = "float16"  # weights of the export (loaded back as float32)

    def validate(self) -> None:
        super().validate()
        check_conditions((self.condition,), "config key 'options.condition'")
        if self.conditioning_channels not in (1, 3):
            raise InputError("config key 'options.conditioning_channels' must be 1 or 3, got "
                             f"{self.conditioning_channels}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")
        if self.sample_scenes <= 0 or self.sample_steps <= 0 or self.sample_cfg < 0:
            raise InputError("config keys 'options.sample_scenes' and 'options.sample_steps' must be > 0 and "
                             "'options.sample_cfg' >= 0")  # fmt: skip


class ControlRecipe(DenoisingRecipe):
    """Base of the spatial control recipes. A subclass names its network (`control`, the key in `models` and
    the export's folder), builds it (`fresh_control`, `load_control`), gives its input channels
    (`network_channels`), says how it enters the UNet (`residuals`) and which diffusers pipeline draws the grid."""

    Options = ControlOptions
    control: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 16, "lr": 1e-4, "warmup_steps": 0,
                                          "lr_schedule": "constant"}  # fmt: skip

    # ---------------------------------------------------------------- set-up
    def build(self) -> None:
        o = self.options
        self.conditions = (o.condition,)
        b = Bundle.from_pretrained(o.base)
        self.base_bundle = b
        self.tokenizer = b.tokenizer
        self.set_scheduler(b.scheduler)
        self.models = {"text_encoder": b.text_encoder, "vae": b.vae, "unet": b.unet}
        network = self.load_control(o.init) if o.init else self.fresh_control(b)
        where = f"options.init ('{o.init}')" if o.init else f"recipe '{self.name}'"
        if (n := self.network_channels(network)) != o.conditioning_channels:
            raise InputError(f"{where}: the {self.control} takes {n}-channel conditions, options.conditioning_channels "
                             f"is {o.conditioning_channels}")  # fmt: skip
        self.models[self.control] = network
        self.trainable = (self.control,)
        self.map_channels = condition_channels(o.condition, self.resolution)
        if self.map_channels not in (o.conditioning_channels, 1):
            raise InputError(f"options.condition '{o.condition}' gives {self.map_channels}-channel maps; the "
                             f"{self.control} takes {o.conditioning_channels}: set options.conditioning_channels "
                             f"to {self.map_channels}")  # fmt: skip

    def fresh_control(self, base: Bundle) -> torch.nn.Module:
        raise NotImplementedError

    def load_control(self, path: str) -> torch.nn.Module:
        raise NotImplementedError

    def network_channels(self, network: torch.nn.Module) -> int:
        raise NotImplementedError

    def vae_origin(self) -> str:
        return f"options.base ('{self.options.base}')"

    # ---------------------------------------------------------------- the step
    def control_image(self, maps: torch.Tensor) -> torch.Tensor:
        """The batch's maps as the network's input: N x conditioning_channels x H x W in [0, 1]."""
        want = self.options.conditioning_channels
        if maps.ndim != 4 or maps.shape[1] not in (want, 1):
            raise InputError(f"condition '{self.options.condition}' came as {tuple(maps.shape)}; the {self.control} "
                             f"takes N x {want} x H x W maps (or 1-channel ones, repeated)")  # fmt: skip
        return maps.expand(-1, want, -1, -1).to(self.device)

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**super().condition(batch), "control": self.control_image(batch[self.options.condition])}

    def residuals(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  image: torch.Tensor) -> dict[str, Any]:  # fmt: skip
        """The UNet keyword arguments that carry the control network's output."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        rest = {k: v for k, v in cond.items() if k != "control"}
        extra = self.residuals(noisy, timesteps, cond["encoder_hidden_states"], cond["control"])
        return super().predict(noisy, timesteps, {**rest, **extra})

    # ---------------------------------------------------------------- viewing and export
    def pipeline(self) -> Any:
        """The diffusers pipeline that samples with the control network (for the progress grid)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Test-split scenes: the condition | the control's output under the scene's caption | the source render,
        drawn by diffusers' own pipeline for the network (DDIM, seed i for scene i)."""
        from mmsynth.annotate.scene import from_scene
        from mmsynth.data.captions import captions
        from mmsynth.data.render import render
        from mmsynth.data.scene import sample_scene

        network = self.unwrapped(self.control)
        was_training = network.training
        network.eval()
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)  # the trainer's own progress (or log.csv) is the run's record
        r, tiles = self.resolution, []
        for i in range(self.options.sample_scenes):
            scene = sample_scene("test", i)
            image = render(scene, r)
            shown = prepared(self.options.condition, from_scene(self.options.condition, scene, r))
            prompt = captions(scene, 1)[0]
            seen = self.control_image(shown[None])
            out = pipe(prompt, image=seen, height=r, width=r,
                       num_inference_steps=self.options.sample_steps, guidance_scale=self.options.sample_cfg,
                       generator=torch.Generator().manual_seed(i), output_type="np").images[0]  # fmt: skip
            as_uint8 = (seen[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            as_uint8 = as_uint8[..., 0] if as_uint8.shape[2] == 1 else as_uint8
            tiles += [label(as_uint8, self.options.condition, height=10),
                      label((out * 255).round().astype(np.uint8), prompt, height=10), label(image, "source", height=10)]
        network.train(was_training)
        return grid(tiles, cols=3)

    def pipeline_parts(self) -> dict[str, Any]:
        """The base bundle's modules as a diffusers pipeline's keyword arguments, with our control network."""
        return {"vae": self.models["vae"], "text_encoder": self.models["text_encoder"], "tokenizer": self.tokenizer,
                "unet": self.unwrapped("unet"), "scheduler": type(self.scheduler).from_config(self.scheduler.config),
                "safety_checker": None,
                "feature_extractor": None, "requires_safety_checker": False}  # fmt: skip

    def export(self, out: Path) -> Path:
        """OUT/<control>/ in the network's diffusers format (`from_pretrained` loads it), listed as a component."""
        return save_components(out, dtype=SAVE_DTYPES[self.options.save_dtype],
                               **{self.control: self.unwrapped(self.control)})  # fmt: skip
