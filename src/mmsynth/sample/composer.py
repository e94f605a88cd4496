"""Composer (Huang et al. 2023) through the one sampler: generate from any subset of an image's representations,
recombine representations of several images, and guide between two condition sets.

`decompose(bundle, image, names)` turns an image into representations: local maps (sketch: XDoG lines, segmentation,
depth, intensity, the masked image with its mask) and global vectors (the CLIP image embedding, the CIELab colour
histogram); the caption is the request's prompt. The `composer` control feeds them to a Composer UNet (the bundle's
`composer_unet`) through its conditioner (`composer`, models/composer.py): per guidance branch the summed local
embeddings as extra input channels, the global vector as class labels (added to the timestep embedding) and the
image and colour tokens as extra context. The unconditional branch gets every condition's null.

Guidance directions between condition sets (the paper's eps = w * eps(c2) + (1 - w) * eps(c1)): with `reference`
(the representations c1) the control replaces classifier-free guidance's branches by [c1, c2 (weight w)], the
loop's condition sets as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mmsynth.annotate.network_input import as_condition
from mmsynth.errors import InputError
from mmsynth.models.composer import GLOBAL_CONDITIONS, LOCAL_CONDITIONS
from mmsynth.sample.controls import Branch, Control, ModelInputs, Step, decode_array, is_number, register_control

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

COMPOSER_UNET = "composer_unet"
COMPOSER = "composer"
HOW = "train them with `mmsynth train composer`, or point --model at a bundle that has them"
# what each local representation is made with (annotate's kinds), from an arbitrary image
ANNOTATORS = {"sketch": "xdog", "segmentation": "segmentation", "depth": "depth", "intensity": "intensity"}
REPRESENTATIONS: tuple[str, ...] = (*LOCAL_CONDITIONS, "image", "histogram")  # what decompose() makes


def decompose(bundle: Any, image: np.ndarray, names: list[str], mask: np.ndarray | None = None,
              scene: Any = None) -> dict[str, Any]:  # fmt: skip
    """Representations `names` of `image` (HxWx3 uint8): local maps as uint8 images, global ones as float vectors.
    `mask` (HxW bool, True = hidden) is the masked image's; `scene` (a Shapes spec) gives exact maps (depth needs one:
    no depth estimator ships)."""
    from mmsynth.annotate.network_input import network_input
    from mmsynth.annotate.registry import get_annotator
    from mmsynth.annotate.scene import from_scene

    if unknown := [n for n in names if n not in REPRESENTATIONS]:
        raise InputError(f"unknown representation '{unknown[0]}'; valid: {', '.join(REPRESENTATIONS)}")
    out: dict[str, Any] = {}
    for name in names:
        if name in ANNOTATORS:
            kind = ANNOTATORS[name]
            value = (from_scene(kind, scene, image.shape[0]) if scene is not None
                     else get_annotator(kind)(image))  # fmt: skip
            out[name] = network_input(kind, value)
        elif name == "masked_image":
            if mask is None:
                raise InputError("representation 'masked_image' needs a mask (white = hidden)")
            out[name] = np.concatenate([image * ~mask[..., None], mask[..., None].astype(np.uint8) * 255], axis=2)
        elif name == "histogram":
            out[name] = get_annotator("histogram")(image).astype(np.float32)
        else:  # image: the bundle CLIP's image embedding
            out[name] = clip_embedding(bundle, image)
    return out


def clip_embedding(bundle: Any, image: np.ndarray) -> np.ndarray:
    """The bundle CLIP's projected, unit-length embedding of `image`."""
    from mmsynth.models.zoo import image_features

    clip = getattr(bundle, "clip", None)
    if clip is None:
        raise InputError("representation 'image' is the bundle CLIP's image embedding, and this model has no clip/")
    pixels = bundle.clip_processor(images=[image], return_tensors="pt").pixel_values
    param = next(clip.parameters())
    with torch.no_grad():
        return image_features(clip, pixels.to(param.device, param.dtype))[0].float().cpu().numpy()


def pooled_text(bundle: Any, prompts: list[str]) -> torch.Tensor:
    """The text encoder's pooled output per prompt (its end-of-text token), the caption's global representation."""
    from mmsynth.models.tokenizer import tokenize_padded

    enc = bundle.text_encoder
    if enc is None:
        raise InputError("composer: the caption's representation needs a text encoder, and this model has none")
    ids = tokenize_padded(bundle.tokenizer, prompts, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids.to(next(enc.parameters()).device)).pooler_output


def _as_map(name: str, value: Any) -> torch.Tensor:
    """A local representation as 1 x C x H x W in [0, 1] (what the conditioner's encoders read)."""
    arr = np.asarray(decode_array(value, f"composer: '{name}'"))
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise InputError(f"composer: '{name}' must be an HxW or HxWxC uint8 image (a representation map), got "
                         f"{arr.dtype} {arr.shape}")
    t = as_condition(arr)  # as the trainer's batches hold maps (C x H x W in [0, 1])
    want = LOCAL_CONDITIONS[name]
    if t.shape[0] != want:
        t = t.mean(dim=0, keepdim=True) if want == 1 else t.expand(want, -1, -1) if t.shape[0] == 1 else t
    if t.shape[0] != want:
        raise InputError(f"composer: '{name}' has {t.shape[0]} channels; it takes {want}")
    return t[None]


def _per_image(value: Any) -> bool:
    """A list of per-image values (maps or vectors), not one vector written as a list of numbers."""
    return isinstance(value, list) and bool(value) and not all(is_number(x) for x in value)


def _check(conditions: Any, what: str) -> dict[str, Any]:
    if not isinstance(conditions, dict):
        raise InputError(f"composer: {what} must be an object of representation -> value, got "
                         f"{type(conditions).__name__}")  # fmt: skip
    valid = (*LOCAL_CONDITIONS, *GLOBAL_CONDITIONS)
    if unknown := [k for k in conditions if k not in valid or k == "caption"]:
        raise InputError(f"composer: unknown representation '{unknown[0]}' in {what}; valid: "
                         f"{', '.join(v for v in valid if v != 'caption')} (the caption is the prompt)")
    return dict(conditions)


@register_control
@dataclass(kw_only=True)
class Composer(Control):
    """conditions: representation -> value (maps as uint8 images or paths, `image` and `histogram` as vectors, as
    `decompose` makes them; or a list of n, one per image); the caption is the request's prompt. reference: another
    set (c1) to guide from, with `weight` w: eps = w * eps(conditions) + (1 - w) * eps(reference), replacing
    classifier-free guidance."""

    name: ClassVar[str] = "composer"
    per_image: ClassVar[tuple[str, ...]] = ("conditions", "reference")

    conditions: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    weight: float = 3.0
    model: str = COMPOSER
    unet: str = COMPOSER_UNET

    def __post_init__(self) -> None:
        self.conditions = _check(self.conditions, "conditions")
        if self.reference is not None:
            self.reference = _check(self.reference, "reference")
        if not is_number(self.weight):
            raise InputError(f"composer: weight must be a number, got {self.weight!r}")

    @classmethod
    def option_for_image(cls, key: str, value: Any, i: int) -> Any:
        """A representation given per image (a list of maps or of vectors) keeps image i's."""
        if not isinstance(value, dict):
            return value
        return {k: (v[i] if len(v) > 1 else v[0]) if _per_image(v) else v for k, v in value.items()}

    def unet_name(self, bundle: Any) -> str | None:
        extras = getattr(bundle, "extras", {})
        if missing := [name for name in (self.model, self.unet) if name not in extras]:
            raise InputError(f"composer: this model has no {' or '.join(missing)} component; {HOW}")
        return self.unet

    def condition_sets(self, ctx: Context, branches: list[Branch]) -> list[Branch]:
        if self.reference is None:
            return branches
        cond = next((b for b in branches if b.name == "cond"), branches[-1])
        return [Branch("reference", 0.0, cond.context, cond.added_cond), Branch("cond", float(self.weight),
                                                                                cond.context, cond.added_cond)]

    def prepare(self, ctx: Context) -> None:
        self._net = ctx.bundle.extras[self.model]
        caption = None  # the prompt's pooled embedding, encoded once for every set that has the caption
        if "caption" in self._net.config.global_conditions and any(ctx.request.prompts()):
            caption = pooled_text(ctx.bundle, ctx.request.prompts())
        self._sets = {"cond": self._encode(ctx, self.conditions, caption), "uncond": self._encode(ctx, {}, None)}
        if self.reference is not None:
            self._sets["reference"] = self._encode(ctx, self.reference, caption)

    def _encode(self, ctx: Context, conditions: dict[str, Any], caption: torch.Tensor | None) -> ModelInputs:
        """One condition set's inputs for the whole batch (n images)."""
        net, n = self._net, ctx.request.n
        size = (ctx.height // ctx.denoiser.scale_factor, ctx.width // ctx.denoiser.scale_factor)
        maps, vectors = {}, {}
        for name, value in conditions.items():
            values = value if _per_image(value) else [value]
            if len(values) not in (1, n):
                raise InputError(f"composer: '{name}' has {len(values)} values for a batch of {n}; give one per image")
            if name in LOCAL_CONDITIONS:
                m = torch.cat([_as_map(name, v) for v in values])
                if m.shape[-2:] != (ctx.height, ctx.width):
                    raise InputError(f"composer: '{name}' is {m.shape[-1]}x{m.shape[-2]} but the request generates "
                                     f"{ctx.width}x{ctx.height}")
                maps[name] = m.expand(n, -1, -1, -1)
            else:
                vectors[name] = torch.stack([torch.as_tensor(np.asarray(v, np.float32)).reshape(-1)
                                             for v in values]).expand(n, -1)  # fmt: skip
        for name, dim in net.config.global_conditions.items():
            if name in vectors and vectors[name].shape[1] != dim:
                raise InputError(f"composer: '{name}' has {vectors[name].shape[1]} values; this model takes {dim}")
        if caption is not None:
            vectors["caption"] = caption
        with torch.no_grad():
            return ModelInputs(extra_channels=net.local_channels(maps, n, size).to(ctx.dtype),
                               class_labels=net.global_vector(vectors, n).to(ctx.dtype),
                               extra_context=net.tokens(vectors, n).to(ctx.dtype))

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        return self._sets.get(branch.name, self._sets["uncond"])

    def close(self, ctx: Context) -> None:
        for key in ("_net", "_sets"):
            self.__dict__.pop(key, None)
