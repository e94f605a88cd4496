"""Paint-by-Example (Yang et al. 2023) in miniature: exemplar-based inpainting, trained self-supervised on Shapes.

Each example picks one object of the scene. Its exemplar is the object's box plus a margin (the reference code's
10 px at 512, scaled), resized to the encoder's input and augmented so that copying it cannot pay: horizontal flip
(0.5), rotation within 20 degrees, Gaussian blur (0.3), elastic deformation (0.3). The mask is the box grown by a
random share (0-40%) of the free space on each side, and with probability 0.5 an irregular outline instead: four
quadratic Bezier edges between the grown box's corners with jittered control points. The target is the scene itself,
so the model learns to paint an object that matches the exemplar into the hole, fitted to its surroundings.

Networks: the 9-channel UNet starts from the base bundle's inpainting UNet (or its text-to-image UNet widened), its
input convolution rearranged to Paint-by-Example's order and keep-mask convention (`paint_by_example_unet`); the
exemplar encoder (models/exemplar_encoder.py) starts from the base's CLIP vision tower. Context: the encoder's one
token, or its learned unconditional token for `uncond_rate` (0.2) of the examples. The UNet and the encoder's
mapper, norm, projection and unconditional token train; the vision tower trains only with `train_tower`. With
`lora_rank` > 0 (default 8) the UNet trains as a LoRA on its attention projections plus its input convolution in
full, which is what ships within the zoo's weight budget (0: the whole UNet, as the paper).
Export: RUN/final/, the base bundle with the two components added, `paint_by_example_unet` and
`paint_by_example_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.data.scene import Scene
from mmsynth.errors import InputError
from mmsynth.models.bundle import INPAINTING_UNET, Bundle, add_components
from mmsynth.models.exemplar_encoder import exemplar_encoder_from_clip
from mmsynth.sample.paint_by_example import PBE_ENCODER, PBE_UNET
from mmsynth.train.denoising import DenoisingOptions, DenoisingRecipe, add_lora, train_only
from mmsynth.train.recipe import evaluating
from mmsynth.train.recipes.inpaint import inpainting_unet
from mmsynth.train.recipes.t2i import SAVE_DTYPES

SAMPLE_SCENES = 4  # test-split scenes in the progress grid: scene | mask | exemplar | painted


@dataclass
class PaintByExampleOptions(DenoisingOptions):
    base: str = "models/shapes-v1"  # bundle with a VAE, a CLIP (its vision tower) and a UNet (inpainting preferred)
    uncond_rate: float = 0.2  # examples conditioned on the learned unconditional token (classifier-free guidance)
    margin: float = 0.02  # exemplar crop: the object's box plus this share of the image side (10 px at 512)
    grow: tuple[float, float] = (0.0, 0.4)  # mask: the box grown by a share of the free space per side, drawn here
    bezier_rate: float = 0.5  # masks with an irregular (Bezier) outline instead of the grown box
    flip_rate: float = 0.5
    rotation: float = 20.0  # degrees, both ways
    blur_rate: float = 0.3
    elastic_rate: float = 0.3
    train_tower: bool = False  # also train the encoder's CLIP vision tower (the paper does; bigger export)
    lora_rank: int = 8  # > 0: a LoRA on the UNet's attention, its input convolution in full (ships small); 0: all
    sample_steps: int = 25
    sample_cfg: float = 5.0
    save_dtype: str = "float16"

    def validate(self) -> None:
        super().validate()
        rates = {"uncond_rate": self.uncond_rate, "bezier_rate": self.bezier_rate, "flip_rate": self.flip_rate,
                 "blur_rate": self.blur_rate, "elastic_rate": self.elastic_rate}
        for key, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise InputError(f"config key 'options.{key}' must be in [0, 1], got {value}")
        lo, hi = self.grow
        if not 0.0 <= lo <= hi <= 1.0:
            raise InputError(f"config key 'options.grow' must be [low, high] with 0 <= low <= high <= 1, got "
                             f"{list(self.grow)}")
        if not 0.0 <= self.margin < 0.5 or not 0.0 <= self.rotation <= 180.0:
            raise InputError("config keys 'options.margin' must be in [0, 0.5) and 'options.rotation' in [0, 180]")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"config key 'options.save_dtype' must be one of {', '.join(SAVE_DTYPES)}")
        if self.sample_steps <= 0 or self.sample_cfg < 0:
            raise InputError("config keys 'options.sample_steps' must be > 0 and 'options.sample_cfg' >= 0")
        if self.lora_rank < 0:
            raise InputError(f"config key 'options.lora_rank' must be >= 0 (0: the whole UNet), got {self.lora_rank}")


def paint_by_example_unet(inpainting: Any) -> Any:
    """A copy of an SD-layout inpainting UNet (latents, repaint mask, masked latents) taking Paint-by-Example's input
    (latents, masked latents, keep mask), computing the same function: the input convolution's channels reordered and
    the mask's weight negated with its sum moved into the bias (repaint = 1 - keep; exact away from the zero padding
    at the border)."""
    from diffusers import UNet2DConditionModel

    c = (int(inpainting.config.in_channels) - 1) // 2
    unet = UNet2DConditionModel.from_config(inpainting.config)
    state = {k: v.clone() for k, v in inpainting.state_dict().items()}
    w, b = state["conv_in.weight"], state["conv_in.bias"]
    mask_w = w[:, c: c + 1]
    state["conv_in.weight"] = torch.cat([w[:, :c], w[:, c + 1:], -mask_w], dim=1)
    state["conv_in.bias"] = b + mask_w.sum(dim=(1, 2, 3))
    unet.load_state_dict(state)
    return unet


def exemplar_mask(box: tuple[float, float, float, float], resolution: int, rng: np.random.Generator,
                  options: PaintByExampleOptions) -> np.ndarray:  # fmt: skip
    """HxW float mask (1 = repaint) over an object's box (normalised x0, y0, x1, y1): grown by a random share of the
    free space per side, with a Bezier outline through the grown corners with probability `bezier_rate`."""
    import cv2

    x0, y0, x1, y1 = box
    g = rng.uniform(*options.grow, size=4)
    x0, y0, x1, y1 = x0 - g[0] * x0, y0 - g[1] * y0, x1 + g[2] * (1 - x1), y1 + g[3] * (1 - y1)
    mask = np.zeros((resolution, resolution), np.uint8)
    if rng.random() < options.bezier_rate:
        corners = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        centre = corners.mean(axis=0)
        t = np.linspace(0.0, 1.0, 16)[:, None]
        points = []
        for k in range(4):
            a, b = corners[k], corners[(k + 1) % 4]
            mid = (a + b) / 2
            control = mid + (mid - centre) * rng.uniform(-0.4, 0.4)  # the edge bulges out or in
            points.append((1 - t) ** 2 * a + 2 * (1 - t) * t * control + t**2 * b)
        outline = np.clip(np.concatenate(points) * resolution, 0, resolution - 1).round().astype(np.int32)
        cv2.fillPoly(mask, [outline], 1)
    a, b, c, d = (int(round(min(max(v, 0.0), 1.0) * resolution)) for v in (x0, y0, x1, y1))
    if not mask.any():  # the box (and a degenerate outline's fallback)
        mask[b: max(d, b + 1), a: max(c, a + 1)] = 1
    return mask.astype(np.float32)


class PaintByExampleRecipe(DenoisingRecipe):
    name = "paint-by-example"
    Options = PaintByExampleOptions
    description = "Paint-by-Example: a 9-channel inpainting UNet conditioned on an exemplar's one CLIP token"
    trains_on_latents = False  # masks and exemplars come from the pixels every step
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 32, "lr": 1e-4, "warmup_steps": 100}

    def build(self) -> None:
        o = self.options
        b = Bundle.from_pretrained(o.base, load_clip=True)
        if b.clip is None:
            raise InputError(f"options.base '{o.base}' has no clip/: the exemplar encoder starts from its vision tower")
        has_inpainting = INPAINTING_UNET in b.extras
        base_unet = b.extras[INPAINTING_UNET] if has_inpainting else inpainting_unet(b.unet)
        self.base_unet = (base_unet if has_inpainting else b.unet, INPAINTING_UNET if has_inpainting else "unet")
        unet = paint_by_example_unet(base_unet)
        if o.lora_rank:
            add_lora(unet, o.lora_rank)
        encoder = exemplar_encoder_from_clip(b.clip, width=int(unet.config.cross_attention_dim))
        self.set_scheduler(b.scheduler)
        self.models = {"vae": b.vae, "unet": unet, "encoder": encoder}
        self.trainable = ("unet", "encoder")

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().place(device, weight_dtype)
        if not self.options.train_tower:
            self.unwrapped("encoder").model.requires_grad_(False)
        if self.options.lora_rank:
            train_only(self.unwrapped("unet"), ("conv_in.",))

    # ---------------------------------------------------------------- conditions
    def drop_conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`uncond_rate` of the examples take the learned unconditional token (no caption to drop here)."""
        return {**batch, "uncond": (torch.rand(len(batch["index"])) < self.options.uncond_rate).tolist()}

    def _pick(self, batch: dict[str, Any]) -> tuple[list[tuple[float, float, float, float]], torch.Tensor]:
        """Per example one object's box (reproducible from the index and seed) and its repaint mask (n x 1 x H x W)."""
        scenes = batch.get("scene")
        if scenes is None:
            raise InputError("recipe 'paint-by-example' trains on Shapes scenes (their objects' boxes): config key "
                             "'data' must be 'shapes'")
        r, boxes, masks = self.resolution, [], []
        for scene_dict, index in zip(scenes, batch["index"]):
            rng = np.random.default_rng([self.config.seed, int(index), 0xBE])
            scene = Scene.from_dict(scene_dict)
            if not scene.objects:
                raise InputError("recipe 'paint-by-example' needs scenes with at least one object")
            box = tuple(float(v) for v in scene.objects[int(rng.integers(len(scene.objects)))].box())
            boxes.append(box)
            masks.append(exemplar_mask(box, r, rng, self.options))
        return boxes, torch.from_numpy(np.stack(masks))[:, None].to(self.device)

    def exemplars(self, pixels: torch.Tensor, boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
        """The objects cropped out of `pixels` ([-1, 1]) with a margin, at the encoder's size, augmented."""
        import kornia.augmentation as K
        from kornia.geometry.transform import crop_and_resize

        o, r = self.options, pixels.shape[-1]
        size = int(self.unwrapped("encoder").config.image_size)
        corners = []
        for x0, y0, x1, y1 in boxes:
            a, b, c, d = (min(max(v, 0.0), 1.0) * (r - 1) for v in (x0 - o.margin, y0 - o.margin, x1 + o.margin,
                                                                     y1 + o.margin))
            corners.append([[a, b], [c, b], [c, d], [a, d]])
        crops = crop_and_resize(pixels, torch.tensor(corners, dtype=pixels.dtype, device=pixels.device), (size, size))
        augment = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=o.flip_rate), K.RandomRotation(o.rotation, p=1.0 if o.rotation else 0.0),
            K.RandomGaussianBlur((3, 3), (0.1, 1.5), p=o.blur_rate),
            K.RandomElasticTransform(alpha=(1.0, 1.0), sigma=(8.0, 8.0), p=o.elastic_rate))  # fmt: skip
        return augment((crops + 1) / 2) * 2 - 1  # kornia's augmentations work on [0, 1]

    def condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The exemplar's token (or the unconditional one) as the context; the masked scene's latents and the keep
        mask as the UNet's extra channels."""
        boxes, repaint = self._pick(batch)
        pixels = batch["pixel_values"].to(self.device)
        vae, encoder = self.models["vae"], self.models["encoder"]
        keep = 1 - repaint
        with torch.no_grad():
            masked = vae.encode((pixels * keep).to(self.weight_dtype)).latent_dist.mode().float()
            masked = masked * vae.config.scaling_factor
            exemplars = self.exemplars(pixels.float(), boxes)
        tokens = encoder(exemplars)
        uncond = torch.tensor(batch["uncond"], device=self.device)[:, None, None]
        unwrapped = self.unwrapped("encoder")
        context = torch.where(uncond, unwrapped.uncond_vector.expand_as(tokens), tokens)
        small = F.interpolate(keep, size=tuple(masked.shape[-2:]))
        return {"encoder_hidden_states": context, "channels": torch.cat([masked, small], dim=1)}

    # ---------------------------------------------------------------- viewing and export
    def bundle(self) -> Bundle:
        b = Bundle.from_pretrained(self.options.base)
        b.extras[PBE_UNET] = self.unwrapped("unet")
        b.extras[PBE_ENCODER] = self.unwrapped("encoder")
        return b

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray:
        """Test-split scenes: the scene | its mask | the exemplar (another scene's object) | the painted result."""
        from mmsynth.viz import grid

        b = self.bundle()
        with evaluating(b.extras[PBE_UNET], b.extras[PBE_ENCODER]):
            tiles = [t for i in range(SAMPLE_SCENES) for t in self._sample_tiles(b, i, self.resolution)]
        return grid(tiles, cols=4)

    def _sample_tiles(self, b: Bundle, i: int, r: int) -> list[np.ndarray]:
        """Scene 2i of the grid: scene | mask | exemplar (scene 2i + 1's first object) | painted."""
        import cv2

        from mmsynth.data.render import render
        from mmsynth.data.scene import sample_scene
        from mmsynth.sample import GenerationRequest, PaintByExample, sample
        from mmsynth.viz import label

        scene, donor = sample_scene("test", 2 * i), sample_scene("test", 2 * i + 1)
        if not scene.objects or not donor.objects:
            return []
        image, donor_image = render(scene, r), render(donor, r)
        mask = exemplar_mask(scene.objects[0].box(), r, np.random.default_rng(i),
                             PaintByExampleOptions(bezier_rate=0.0))  # fmt: skip
        x0, y0, x1, y1 = (int(round(v * r)) for v in donor.objects[0].box())
        exemplar = np.ascontiguousarray(donor_image[max(y0, 0): max(y1, y0 + 1), max(x0, 0): max(x1, x0 + 1)])
        request = GenerationRequest(n=1, seed=i, steps=self.options.sample_steps, cfg=self.options.sample_cfg)
        control = PaintByExample(image=image, mask=(mask * 255).astype(np.uint8), exemplar=exemplar)
        out = sample(b, request, [control], progress=False).images[0]
        shown = np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2)
        big = cv2.resize(exemplar, (r, r), interpolation=cv2.INTER_NEAREST)
        return [label(image, "scene", height=10), label(shown, "mask", height=10),
                label(big, "exemplar", height=10), label(out, "painted", height=10)]

    def export(self, out: Path) -> Path:
        """OUT/: the base bundle with the two components added (fp16 unless options.save_dtype says otherwise), a
        model `mmsynth generate --exemplar` runs as it is: the UNet as the layers and LoRA it adds to its base
        (`models.components.save_layers`), the encoder whole."""
        dtype = SAVE_DTYPES[self.options.save_dtype]
        Bundle.from_pretrained(self.options.base).save_pretrained(out, dtype=dtype)
        base, base_name = self.base_unet
        add_components(out, dtype, layered={PBE_UNET: (self.unwrapped("unet"), base, base_name)},
                       whole={PBE_ENCODER: self.unwrapped("encoder")})
        return out
