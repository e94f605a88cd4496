"""An inpainting UNet (Stable Diffusion inpainting's recipe in miniature), fine-tuned from a text-to-image bundle.

The UNet takes the noisy latents plus the mask and the masked image's latents (2C + 1 input channels,
`sample.inpaint.inpainting_channels`, the layout diffusers' StableDiffusionInpaintPipeline feeds). It starts
from the base bundle's UNet: the first input convolution keeps the base's weights for the latent channels and
starts at zero for the new ones, so at step 0 it predicts exactly what the base predicts (how SD inpainting was
initialised from SD). Masks are drawn per example: an object's box joined with a box of about its size nearby
(what replacing an object needs: the bench's inpainting masks are such unions), a random rectangle, or the
whole image (the model keeps text-to-image). The caption describes the whole image, as at sampling time.

The export is a full bundle whose UNet is the inpainting one; `mmsynth zoo ship inpainting` puts that UNet into
a shipped bundle as its named component `unet_inpainting` (`models.bundle.INPAINTING_UNET`, listed in the
bundle's component manifest), where `BlendedInpaint` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from mmsynth.data.scene import Scene
from mmsynth.errors import InputError
from mmsynth.sample.inpaint import inpainting_channels
from mmsynth.train.recipes.t2i import TextToImageOptions, TextToImageRecipe
from mmsynth.viz import grid, label

SAMPLE_SCENES = 4  # test-split scenes drawn in the progress grid (source | mask | inpainted)


@dataclass
class InpaintOptions(TextToImageOptions):
    base: str | None = "models/shapes-v1"  # the text-to-image bundle whose UNet is extended and fine-tuned
    object_masks: float = 0.6  # share of masks over an object's box (joined with a nearby box of its size)
    full_masks: float = 0.15  # share of masks over the whole image (text-to-image); the rest: random rectangles
    margin: tuple[float, float] = (0.02, 0.08)  # an object mask grows by a margin drawn from this range

    def validate(self) -> None:
        super().validate()
        if not self.base:
            raise InputError("config key 'options.base' must name a text-to-image bundle (e.g. models/shapes-v1)")
        if self.grounding_weight:
            raise InputError("config key 'options.grounding_weight' is for the t2i recipe; inpaint does not use it")
        shares = (self.object_masks, self.full_masks)
        if not all(0 <= s <= 1 for s in shares) or sum(shares) > 1:
            raise InputError("config keys 'options.object_masks' and 'options.full_masks' must be in [0, 1] with a "
                             f"sum <= 1, got {self.object_masks} and {self.full_masks}")
        lo, hi = self.margin
        if not 0 <= lo <= hi < 0.5:
            raise InputError(f"config key 'options.margin' must be [low, high] with 0 <= low <= high < 0.5, "
                             f"got {list(self.margin)}")


def inpainting_unet(base_unet: Any) -> Any:
    """A copy of `base_unet` taking 2C + 1 input channels, predicting exactly what the base predicts until trained."""
    from diffusers import UNet2DConditionModel

    c = int(base_unet.config.in_channels)
    unet = UNet2DConditionModel.from_config({**base_unet.config, "in_channels": 2 * c + 1})
    state = base_unet.state_dict()
    weight = state["conv_in.weight"]
    wide = torch.zeros(weight.shape[0], 2 * c + 1, *weight.shape[2:], dtype=weight.dtype)
    wide[:, :c] = weight
    state["conv_in.weight"] = wide
    unet.load_state_dict(state)
    return unet


def training_mask(scene: Scene | None, resolution: int, rng: np.random.Generator, options: InpaintOptions
                  ) -> np.ndarray:  # fmt: skip
    """An HxW float mask (1 = repaint): an object's box joined with a nearby box, a random rectangle, or all."""
    u = rng.random()
    if u < options.full_masks:
        return np.ones((resolution, resolution), np.float32)
    if u < options.full_masks + options.object_masks and scene is not None and scene.objects:
        x0, y0, x1, y1 = scene.objects[int(rng.integers(len(scene.objects)))].box()
        w, h = x1 - x0, y1 - y0
        if rng.random() < 0.7:  # the box of a replacement: about the object's size, its centre nearby
            s = rng.uniform(0.7, 1.4)
            cx, cy = (x0 + x1) / 2 + rng.uniform(-0.5, 0.5) * w, (y0 + y1) / 2 + rng.uniform(-0.5, 0.5) * h
            x0, y0 = min(x0, cx - s * w / 2), min(y0, cy - s * h / 2)
            x1, y1 = max(x1, cx + s * w / 2), max(y1, cy + s * h / 2)
        m = rng.uniform(*options.margin)
        box = (x0 - m, y0 - m, x1 + m, y1 + m)
    else:
        w, h = rng.uniform(0.2, 0.7, size=2)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        box = (x0, y0, x0 + w, y0 + h)
    a, b, c, d = (int(round(min(max(v, 0.0), 1.0) * resolution)) for v in box)
    mask = np.zeros((resolution, resolution), np.float32)
    mask[b: max(d, b + 1), a: max(c, a + 1)] = 1.0
    return mask


class InpaintRecipe(TextToImageRecipe):
    name = "inpaint"
    Options = InpaintOptions
    description = "inpainting UNet (latents + mask + masked-image latents) fine-tuned from a text-to-image bundle"
    trains_on_latents = False  # the masked images are encoded every step
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 64, "lr": 2e-4, "warmup_steps": 100}

    def build(self) -> None:
        super().build()  # loads options.base (tokenizer, text encoder, VAE, UNet, scheduler, CLIP)
        self.models["unet"] = inpainting_unet(self.models["unet"])

    def masks(self, batch: dict[str, Any]) -> torch.Tensor:
        """One training mask per example (n x 1 x H x W), reproducible from the example's index and the seed."""
        r = self.resolution
        out = []
        for scene, index in zip(batch["scene"], batch["index"]):
            rng = np.random.default_rng([self.config.seed, int(index), 0x1A5])
            out.append(training_mask(Scene.from_dict(scene) if scene else None, r, rng, self.options))
        return torch.from_numpy(np.stack(out))[:, None].to(self.device)

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The text, plus the UNet's extra channels: the mask and the latents (posterior mean) of the image with
        the mask blanked."""
        mask = self.masks(batch)
        vae = self.models["vae"]
        with torch.no_grad():
            masked = (batch["pixel_values"].to(self.device) * (1 - mask)).to(self.weight_dtype)
            latents = vae.encode(masked).latent_dist.mode().float() * vae.config.scaling_factor
        return {**super().condition(batch), "channels": inpainting_channels(mask, latents)}

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Test-split scenes with an object-box mask: source | mask | inpainted under the scene's caption."""
        from mmsynth.data.captions import captions
        from mmsynth.data.render import render
        from mmsynth.data.scene import sample_scene
        from mmsynth.sample import BlendedInpaint, GenerationRequest, sample

        b = self.bundle()
        was_training = b.unet.training
        b.unet.eval()
        r, tiles = self.resolution, []
        for i in range(SAMPLE_SCENES):
            scene = sample_scene("test", i, 0)
            image = render(scene, r)
            mask = training_mask(scene, r, np.random.default_rng([i, 0x1A5]),
                                 InpaintOptions(object_masks=1.0, full_masks=0.0))  # fmt: skip
            prompt = captions(scene, 1)[0]
            request = GenerationRequest(prompt=prompt, n=1, seed=i, steps=self.options.sample_steps,
                                        cfg=self.options.sample_cfg, scheduler="ddim")  # fmt: skip
            control = BlendedInpaint(image=image, mask=(mask * 255).astype(np.uint8))
            out = sample(b, request, [control], progress=False).images[0]
            shown = np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2)
            tiles += [label(image, prompt, height=10), label(shown, "mask", height=10), label(out, "inpainted",
                                                                                              height=10)]
        b.unet.train(was_training)
        return grid(tiles, cols=3)

