"""Feature extractors for fidelity metrics, each under an honest name.

`shapesclip`: the model bundle's own CLIP vision tower (domain-trained; metrics are called fd_shapesclip,
kid_shapesclip, never FID). `inception`: torchmetrics' FID Inception network from a weights file the user
supplies (then the metrics are the real FID/KID); nothing is downloaded. Images reach every extractor resized
once with PIL bicubic to its input size (`evaluate.fidelity.resize_uint8`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmsynth.errors import InputError
from mmsynth.evaluate.fidelity import ImageFeatures, clip_image_features

INCEPTION_SIZE = 299


def shapesclip_features(bundle: Any) -> ImageFeatures:
    """The bundle's CLIP vision tower as a torchmetrics feature network."""
    if getattr(bundle, "clip", None) is None:
        raise InputError("the model bundle has no clip/ folder (a full CLIPModel), which the shapesclip fidelity "
                         "extractor needs: train it with `mmsynth train clip`, or use --extractor inception "
                         "--weights PATH")  # fmt: skip
    return clip_image_features(bundle.clip, name="shapesclip")


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (2048-d pool features) loaded from a local weights file."""

    def __init__(self, weights: str | Path):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError:  # pragma: no cover - torchmetrics always ships these
            raise InputError("--extractor inception needs torchmetrics' image extras") from None
        if not _TORCH_FIDELITY_AVAILABLE:
            raise InputError("--extractor inception needs the torch-fidelity package (pip install torch-fidelity) "
                             "besides the local --weights file")  # fmt: skip
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
            )
        except Exception as exc:
            raise InputError(f"--weights '{weights}' is not a loadable FID Inception weights file ({exc})") from None
        self.num_features = 2048
        self.size = INCEPTION_SIZE
        self.name = "inception"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).reshape(images.shape[0], -1).float()


def inception_features(weights: str | Path | None) -> InceptionFeatures:
    if weights is None or not Path(weights).is_file():
        raise InputError(f"--extractor inception needs --weights PATH to a local weights file, got {weights!r}")
    return InceptionFeatures(weights).eval()


def metric_names(extractor_name: str) -> tuple[str, str]:
    """(Frechet name, KID name): 'fid'/'kid' only for the real Inception features."""
    if extractor_name == "inception":
        return "fid", "kid"
    return f"fd_{extractor_name}", f"kid_{extractor_name}"
