"""Fidelity and diversity of image sets: Frechet distance, KID, k-NN precision/recall, diversity.

Frechet distance and KID come from torchmetrics with a pluggable feature network. On Shapes the
honest default is a domain-trained encoder (the zoo's CLIP vision tower), reported as
`fd_<name>` / `kid_<name>` and never as "FID"; real FID needs Inception weights a user supplies.
Images are resized once, with one method (PIL bicubic, like clean-fid), to the network's input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mmsynth.errors import InputError
from mmsynth.io import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MIN_IMAGES = 2  # torchmetrics needs at least two samples per side for a covariance


class ImageFeatures(nn.Module):
    """Adapt any feature network to torchmetrics: uint8 (N, 3, H, W) in, float (N, D) out.

    `net` receives float images normalised with `mean`/`std` at `size` x `size`.
    """

    def __init__(
        self,
        net: Callable[[Tensor], Tensor],
        num_features: int,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        name: str = "custom",
    ):
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.size = size
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise InputError(f"feature network '{self.name}' expects {self.size}x{self.size} images; resize first")
        return self.net((x - self.mean) / self.std).float()


def clip_image_features(clip: nn.Module, name: str = "shapesclip") -> ImageFeatures:
    """Features from a transformers CLIPModel (or CLIPVisionModelWithProjection): projected image embeddings."""
    from mmsynth.models.zoo import projected

    clip.eval()
    cfg = clip.config.vision_config if hasattr(clip.config, "vision_config") else clip.config
    dim = getattr(clip.config, "projection_dim", None) or cfg.hidden_size

    def net(x: Tensor) -> Tensor:
        if hasattr(clip, "get_image_features"):
            out = clip.get_image_features(pixel_values=x)
        else:
            out = clip(pixel_values=x).image_embeds
        return projected(out)

    proc_mean = (0.48145466, 0.4578275, 0.40821073)
    proc_std = (0.26862954, 0.26130258, 0.27577711)
    return ImageFeatures(net, int(dim), int(cfg.image_size), proc_mean, proc_std, name=name)


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """The one resize used for fidelity: PIL bicubic to size x size (no-op at the right size)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def load_folder(folder: str | Path, size: int) -> Tensor:
    """All images of a folder (recursively, sorted) as uint8 (N, 3, size, size)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder '{folder}' does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "conditions" not in p.parts)
    if not files:
        raise InputError(f"image folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    arr = np.stack([resize_uint8(load_image(p), size) for p in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _check_count(images: Tensor, what: str, need: int = MIN_IMAGES) -> None:
    if images.shape[0] < need:
        raise InputError(f"{what}: {images.shape[0]} image(s) given, this metric needs at least {need}")


def features_of(images: Tensor, features: ImageFeatures, batch_size: int = 64) -> Tensor:
    """Feature vectors (N, D) of uint8 images, in batches."""
    features.eval()
    return torch.cat([features(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def frechet_distance(real: Tensor, fake: Tensor, features: ImageFeatures) -> float:
    """Frechet distance between feature Gaussians (torchmetrics' FID machinery, our features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_count(real, "real images")
    _check_count(fake, "generated images")
    features.eval()
    metric = FrechetInceptionDistance(feature=features, reset_real_features=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, features: ImageFeatures, subsets: int = 50) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased, so meaningful at small sample counts."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_count(real, "real images")
    _check_count(fake, "generated images")
    features.eval()
    subset = min(real.shape[0], fake.shape[0])
    metric = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=subset)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(feats: Tensor, k: int) -> Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): k-NN manifolds in feature space.

    Precision: share of generated samples inside the real manifold; recall: share of real
    samples inside the generated manifold.
    """
    if real_feats.shape[0] <= k or fake_feats.shape[0] <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} images per side")
    real_r, fake_r = _knn_radii(real_feats, k), _knn_radii(fake_feats, k)
    d = torch.cdist(fake_feats, real_feats)  # (n_fake, n_real)
    precision = (d <= real_r[None, :]).any(dim=1).float().mean()
    recall = (fake_r[None, :] >= d.T).any(dim=1).float().mean()
    return float(precision), float(recall)


def diversity(feats_by_group: Sequence[Tensor]) -> float:
    """Mean pairwise feature distance within each group (e.g. one prompt's samples), averaged over groups."""
    vals = []
    for f in feats_by_group:
        if f.shape[0] < 2:
            continue
        d = torch.cdist(f, f)
        n = f.shape[0]
        vals.append(float(d.sum() / (n * (n - 1))))
    if not vals:
        raise InputError("diversity needs at least one group with two or more images")
    return float(np.mean(vals))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Exact PSNR in dB between two uint8 images (over the pixels where mask is true, if given); inf when equal
    (torchmetrics' PSNR has no mask)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    mse = float(d.mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
