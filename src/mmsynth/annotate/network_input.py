"""How a condition map is shown to a control network (ControlNet, T2I-Adapter): one rule for training, sampling
and the bench, so a network sees at sampling time the same kind of image it was trained on.

A label map of a COLOUR_CODED kind ("segmentation": the spec's shape classes, or the k-means colour segmentation
of an image) is colour-coded,
one fixed colour per label (`viz.colorize_labels`, 0 = background black), as ControlNet's segmentation images are:
label ids used as intensities would be nearly black and ordered arbitrarily. Any other map (edges, depth, a palette,
an already colour-coded image) is passed as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsynth.viz import colorize_labels

# the raw id maps ("semantic", "instance") stay ids: they are labels for losses and metrics, not network inputs
COLOUR_CODED: tuple[str, ...] = ("segmentation",)


def network_input(kind: str, value: Any) -> np.ndarray:
    """Map `value` of condition kind `kind` as a control network's input image (HxW or HxWx3 uint8)."""
    arr = np.asarray(value)
    if kind in COLOUR_CODED and arr.ndim == 2:
        return colorize_labels(arr)
    return arr


def as_condition(value: Any) -> Any:
    """A map (uint8 HxW or HxWxC, array or tensor) as a float torch tensor C x H x W in [0, 1], the form a network
    reads it in (the trainer's batches and the sampler's controls alike); a float vector as it is."""
    import torch

    t = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    if t.dtype != torch.uint8:
        return t.float()
    t = t.float() / 255.0
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
