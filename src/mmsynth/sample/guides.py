"""Guides: differentiable losses on decoded images, what universal guidance (universal.py) descends.

A guide is any callable (usually an `nn.Module`) mapping a decoded image batch in [-1, 1], shaped
N x 3 x H x W, to a loss: a scalar or one value per image (N,). Lower is better. A user passes their
own module from Python (`UniversalGuidance(guide=my_module)`); the shipped ones are built by name
from JSON-able parameters, so a guided request replays from its JSON:

- palette  the coarse CIELab palette map (cells x cells area averages, the `palette_error` metric made
           differentiable) or a soft CIELab histogram, against a target image;
- clip     the bundle's CLIP: image-text or image-image cosine distance;
- region   a colour drawn into a mask (Lab distances of the mask's nearest pixels to the colour);
- box      each phrase's colour drawn into its box and out of the rest of the image (layout guidance's aim,
           on pixels, in Lab distances).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmsynth.errors import InputError
from mmsynth.models.tokenizer import tokenize_padded
from mmsynth.models.zoo import projected
from mmsynth.sample.controls import is_integer, is_number

Guide = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- helpers
def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] RGB, clamped (kornia's colour conversions expect [0, 1])."""
    return (images / 2 + 0.5).clamp(0.0, 1.0)


def rgb_to_lab(rgb01: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> CIELab (L in [0, 100]); kornia's conversion, differentiable."""
    import kornia

    return kornia.color.rgb_to_lab(rgb01)


def image_tensor(value: Any, what: str) -> torch.Tensor:
    """An image option (array, path or PNG data URI) as 1 x 3 x H x W float in [0, 1]."""
    from mmsynth.sample.controls import decode_array

    arr = np.asarray(decode_array(value, what))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"{what} must be an HxWx3 RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return torch.from_numpy(arr.astype(np.float32) / scale).permute(2, 0, 1)[None].clamp(0, 1)


def mask_tensor(value: Any, what: str) -> torch.Tensor:
    """A mask option as 1 x 1 x H x W float in [0, 1] (uint8 masks are divided by 255)."""
    from mmsynth.sample.controls import decode_array

    arr = np.asarray(decode_array(value, what))
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise InputError(f"{what} must be an HxW mask, got shape {arr.shape}")
    m = torch.from_numpy(arr.astype(np.float32))
    if m.max() > 1.0:
        m = m / 255.0
    return m[None, None].clamp(0, 1)


@functools.cache
def colour_centres_lab() -> tuple[list[str], torch.Tensor]:
    """The vocabulary's colour names and their CIELab centres (K x 3); cached, since a guide asks every step
    (callers must not modify the tensor in place)."""
    from mmsynth.data.vocab import COLORS

    names = list(COLORS)
    rgb = torch.tensor([COLORS[c] for c in names], dtype=torch.float32) / 255.0
    return names, rgb_to_lab(rgb[:, :, None, None])[:, :, 0, 0]


def colour_distances(images: torch.Tensor) -> torch.Tensor:
    """CIE76 deltaE of every pixel to every vocabulary colour (N x K x H x W); unlike a softmax over the
    classes its gradient never vanishes, so it can pull a background pixel towards a colour."""
    _, centres = colour_centres_lab()
    lab = rgb_to_lab(to_unit(images))
    d2 = ((lab[:, None] - centres.to(lab)[None, :, :, None, None]) ** 2).sum(dim=2)
    return d2.add(1e-6).sqrt()


def colour_index(color: str, what: str) -> int:
    """The row of a colour name in colour_centres_lab's centres; `what` names the input in the error."""
    names = colour_centres_lab()[0]
    if color not in names:
        raise InputError(f"{what}: unknown colour {color!r}; valid: {', '.join(names)}")
    return names.index(color)


# ---------------------------------------------------------------------------------------------- guides
class PaletteGuide(nn.Module):
    """Distance of the image's colour layout to a target image's, in CIELab.

    mode "map": mean CIE76 deltaE between cells x cells area-averaged palettes (what
    `evaluate.palette_error` measures, so the guide descends the bench metric itself);
    mode "histogram": total variation between soft CIELab histograms (bins L x a x b, Gaussian votes;
    Composer's colour condition is such a histogram) -- layout-free, only which colours and how much.
    """

    def __init__(self, target: Any, cells: int = 8, mode: str = "map", bins: tuple[int, int, int] = (11, 5, 5)):
        super().__init__()
        if mode not in ("map", "histogram"):
            raise InputError(f"palette guide: mode must be 'map' or 'histogram', got {mode!r}")
        if not isinstance(cells, int) or cells < 1:
            raise InputError(f"palette guide: cells must be an integer >= 1, got {cells!r}")
        self.mode, self.cells, self.bins = mode, cells, tuple(int(b) for b in bins)
        self.register_buffer("target", self.features(image_tensor(target, "palette guide target") * 2 - 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images)
        if self.mode == "map":
            return rgb_to_lab(F.adaptive_avg_pool2d(x, self.cells))
        return soft_lab_histogram(rgb_to_lab(x), self.bins)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features(images)
        t = self.target.to(f)
        if self.mode == "map":
            return ((f - t) ** 2).sum(dim=1).add(1e-6).sqrt().mean(dim=(1, 2))
        return 0.5 * (f - t).abs().sum(dim=1)


def soft_lab_histogram(lab: torch.Tensor, bins: tuple[int, int, int]) -> torch.Tensor:
    """N x prod(bins) soft histogram of CIELab pixels (L over [0, 100], a and b over [-100, 100])."""
    ranges = ((0.0, 100.0), (-100.0, 100.0), (-100.0, 100.0))
    votes = []
    for ch, (nb, (lo, hi)) in enumerate(zip(bins, ranges)):
        width = (hi - lo) / nb
        centres = torch.linspace(lo + width / 2, hi - width / 2, nb, device=lab.device, dtype=lab.dtype)
        v = torch.exp(-((lab[:, ch: ch + 1] - centres[None, :, None, None]) ** 2) / (2 * (width / 2) ** 2))
        votes.append(v / v.sum(dim=1, keepdim=True).clamp_min(1e-8))  # N x nb x H x W
    joint = torch.einsum("nahw,nbhw,nchw->nabc", *votes).flatten(1)
    return joint / joint.sum(dim=1, keepdim=True)


class ClipGuide(nn.Module):
    """1 - cosine similarity between CLIP embeddings of the image and a text or a target image.

    mean/std: the CLIP's input normalisation on [0, 1] pixels; by default the `processor`'s (a transformers
    CLIPImageProcessor, the bundle's `clip_processor`: OpenAI CLIP's (0.481, 0.458, 0.408) / (0.269, 0.261, 0.276),
    the zoo's 0.5 / 0.5, i.e. [-1, 1]), or 0.5 / 0.5 without one.
    """

    def __init__(self, clip: Any, tokenizer: Any, text: str | None = None, image: Any = None,
                 mean: float | list[float] | None = None, std: float | list[float] | None = None,
                 processor: Any | None = None):
        super().__init__()
        if clip is None:
            raise InputError("clip guide: this model bundle has no CLIP (clip/ folder); use another guide "
                             "or a bundle trained with `mmsynth train clip`")
        if (text is None) == (image is None):
            raise InputError("clip guide: give exactly one of text (image-text) or image (image-image)")
        self.clip = clip
        self.size = int(clip.config.vision_config.image_size)
        if mean is None:
            mean = list(processor.image_mean) if processor is not None else 0.5
        if std is None:
            std = list(processor.image_std) if processor is not None else 0.5
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1))
        with torch.no_grad():
            if text is not None:
                ids = tokenize_padded(tokenizer, [text], return_tensors="pt")
                target = projected(clip.get_text_features(input_ids=ids.input_ids.to(clip.device)))
            else:
                target = self.embed(image_tensor(image, "clip guide image").to(clip.device) * 2 - 1)
        self.register_buffer("target", F.normalize(target.float(), dim=-1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean.to(x)) / self.std.to(x)
        return projected(self.clip.get_image_features(pixel_values=x.to(self.clip.dtype)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.embed(images).float(), dim=-1)
        return 1.0 - (e * self.target.to(e)).sum(dim=-1)


def _check_energy(what: str, fill: Any, margin: Any, repel: Any, cells: Any) -> None:
    if not is_number(fill) or not 0 < fill <= 1:
        raise InputError(f"{what} fill (share of the region the colour covers) must be in (0, 1], got {fill!r}")
    if not is_number(margin) or margin <= 0 or not is_number(repel) or repel < 0:
        raise InputError(f"{what} margin must be > 0 and repel >= 0 (Lab units), got {margin!r}, {repel!r}")
    if not is_integer(cells) or cells < 0:
        raise InputError(f"{what} cells (pooling grid, 0 = full resolution) must be an integer >= 0, got {cells!r}")


class ColourPlacement(nn.Module):
    """A colour drawn into a region and kept out of the rest of the image, in CIELab deltaE units.

    attract = mean Lab distance to the colour of the `fill` share of the region's pixels nearest to it (a shape
    covers ~0.5-0.8 of its box, so only that share is asked to take the colour); repel = `repel` x the sum over
    pixels outside the region of max(0, margin - distance), divided by the attracted pixel count. Both are
    distances, not soft class probabilities: a softmax over the colour classes saturates on background pixels
    (probability ~1e-10, no gradient), so a probability-mass energy can only recolour an object where it
    already is, never draw one where it is asked (measured: box AP50 <= 0.014 at any s0 with it).
    The image is first area-pooled to cells x cells (0 = full resolution): pooled colours give the smooth,
    low-frequency gradients the palette guide has, and fewer decoder artefacts (docs/guidance.md).
    Subclasses give the (colour index, H x W bool region) pairs.
    """

    def __init__(self, fill: float = 0.5, margin: float = 20.0, repel: float = 1.0, cells: int = 16):
        super().__init__()
        _check_energy(type(self).__name__, fill, margin, repel, cells)
        self.fill, self.margin, self.repel, self.cells = float(fill), float(margin), float(repel), int(cells)

    def regions(self, h: int, w: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.cells:
            images = F.adaptive_avg_pool2d(images, self.cells)
        dist = colour_distances(images)  # N x K x H x W
        n, _, h, w = dist.shape
        loss = dist.new_zeros(n)
        for c, region in self.regions(h, w, dist.device):
            d, inside = dist[:, c].flatten(1), region.flatten()
            k = max(1, int(round(self.fill * int(inside.sum()))))
            loss = loss + d[:, inside].topk(k, dim=1, largest=False).values.mean(dim=1)
            if self.repel and not inside.all():
                loss = loss + self.repel * torch.relu(self.margin - d[:, ~inside]).sum(dim=1) / k
        return loss


class RegionGuide(ColourPlacement):
    """Colour `color` drawn into `mask` (ColourPlacement's energy; repel=0 by default leaves the rest free)."""

    def __init__(self, mask: Any, color: str, fill: float = 0.5, margin: float = 20.0, repel: float = 0.0,
                 cells: int = 16):
        super().__init__(fill, margin, repel, cells)
        self.index = colour_index(color, "region guide color")
        m = mask_tensor(mask, "region guide mask")
        if m.sum() < 1:
            raise InputError("region guide mask is empty (no pixel > 0)")
        self.register_buffer("mask", m)

    def regions(self, h: int, w: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        cover = F.interpolate(self.mask, size=(h, w), mode="area")[0, 0]
        m = cover >= 0.5
        if not m.any():  # a mask smaller than one pooled cell: its most covered cell
            m = cover == cover.max()
        return [(self.index, m.to(device))]


class BoxGuide(ColourPlacement):
    """Each phrase's colour drawn into its box and kept out of the rest of the image (ColourPlacement's energy,
    summed over phrases): layout guidance's aim, on pixels.
    boxes: [x0, y0, x1, y1] as fractions of the width/height; phrases: "a red circle" (its colour counts).
    """

    def __init__(self, boxes: list[list[float]], phrases: list[str], fill: float = 0.5, margin: float = 20.0,
                 repel: float = 1.0, cells: int = 16):
        super().__init__(fill, margin, repel, cells)
        from mmsynth.data.captions import parse_caption

        if not isinstance(boxes, list) or not isinstance(phrases, list) or len(boxes) != len(phrases) or not boxes:
            raise InputError("box guide: give one box [x0, y0, x1, y1] per phrase (non-empty lists of equal length)")
        self.colours = []
        for phrase in phrases:
            groups = parse_caption(phrase).groups
            if not groups:
                raise InputError(f"box guide phrase {phrase!r} names no coloured shape (e.g. 'a red circle')")
            self.colours.append(colour_index(groups[0].color, f"box guide phrase {phrase!r}"))
        for b in boxes:
            if (not isinstance(b, (list, tuple)) or len(b) != 4
                    or not all(isinstance(v, (int, float)) for v in b) or not (0 <= b[0] < b[2] <= 1)
                    or not (0 <= b[1] < b[3] <= 1)):
                raise InputError(f"box guide box {b!r} must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1, "
                                 "0 <= y0 < y1 <= 1")
        self.boxes = [list(map(float, b)) for b in boxes]

    def regions(self, h: int, w: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        out = []
        for (x0, y0, x1, y1), c in zip(self.boxes, self.colours):
            m = torch.zeros(h, w, dtype=torch.bool, device=device)
            r0, c0 = int(round(y0 * h)), int(round(x0 * w))
            m[r0: max(int(round(y1 * h)), r0 + 1), c0: max(int(round(x1 * w)), c0 + 1)] = True
            out.append((c, m))
        return out


class PerImageGuides(nn.Module):
    """One guide per image of a batch (each image its own target, boxes, ...): image i is scored by guide i
    alone, so a batch guided this way gives the images of its members guided one at a time."""

    def __init__(self, guides: list[nn.Module]):
        super().__init__()
        if not guides:
            raise InputError("PerImageGuides needs one guide per image (got none)")
        self.guides = nn.ModuleList(guides)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != len(self.guides):
            raise InputError(f"PerImageGuides has {len(self.guides)} guides for a batch of {images.shape[0]} images")
        return torch.stack([guide_loss(g, images[i: i + 1], f"guide {i}") for i, g in enumerate(self.guides)])


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class GuideSpec:
    """How to build a shipped guide from JSON parameters (and the bundle, for model-based guides)."""

    build: Callable[..., nn.Module]
    params: str
    description: str


GUIDES: dict[str, GuideSpec] = {
    "palette": GuideSpec(lambda bundle, **p: PaletteGuide(**p), "target (image), cells=8, mode=map|histogram, bins",
                         "CIELab palette map / soft histogram against a target image"),
    "clip": GuideSpec(lambda bundle, **p: ClipGuide(bundle.clip, bundle.tokenizer,
                                                     processor=getattr(bundle, "clip_processor", None), **p),
                      "text | image, mean, std (default: the CLIP's image processor's)",
                      "CLIP image-text or image-image cosine distance (needs the bundle's CLIP)"),
    "region": GuideSpec(lambda bundle, **p: RegionGuide(**p), "mask, color, fill=0.5, margin=20, repel=0, cells=16",
                        "a colour drawn into a mask (Lab distances)"),
    "box": GuideSpec(lambda bundle, **p: BoxGuide(**p), "boxes, phrases, fill=0.5, margin=20, repel=1, cells=16",
                     "each phrase's colour drawn into its box and out of the rest"),
}


def guide_names() -> list[str]:
    return sorted(GUIDES)


def check_guide_name(name: Any) -> GuideSpec:
    spec = GUIDES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise InputError(f"unknown guide {name!r}; valid: {', '.join(guide_names())} "
                         "(or pass an nn.Module from Python)")
    return spec


def build_guide(name: str, params: dict[str, Any] | None, bundle: Any) -> nn.Module:
    """A shipped guide by name, built for `bundle` (moved to its device)."""
    spec = check_guide_name(name)
    try:
        guide = spec.build(bundle, **dict(params or {}))
    except TypeError as exc:
        raise InputError(f"guide {name!r}: bad parameters ({exc}); valid: {spec.params}") from None
    return guide.to(bundle.device)


def guide_loss(guide: Guide, images: torch.Tensor, name: str = "guide") -> torch.Tensor:
    """Call a guide and check that it gave a scalar or one loss per image; returns their sum (a scalar).

    Summing per-image losses keeps each image's gradient its own (images do not interact).
    """
    loss = guide(images)
    if not isinstance(loss, torch.Tensor):
        raise InputError(f"{name} must return a tensor loss (a scalar or one value per image), "
                         f"got {type(loss).__name__}")
    if loss.ndim == 0:
        return loss
    if loss.ndim == 1 and loss.shape[0] == images.shape[0]:
        return loss.sum()
    raise InputError(f"{name} must return a scalar or one loss per image (shape ({images.shape[0]},)), "
                     f"got shape {tuple(loss.shape)}")
