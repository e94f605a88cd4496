"""Segmentation by colour clustering: k-means in CIELab, labels ordered by cluster lightness.

A weight-free segmenter that works on any image; on Shapes it separates objects of different colours
from the background. Ordering labels by lightness makes the label map deterministic and comparable.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.color import rgb2lab

from mmsynth.annotate.registry import Param, register

MAX_FIT_PIXELS = 20000  # k-means is fitted on a seeded subsample of this many pixels, then applied to all
_CHUNK = 1 << 18


@register(
    "segmentation",
    "colour segmentation: k-means in CIELab, labels 0..k-1 ordered by cluster lightness, HxW uint8",
    "map",
    (
        Param("k", "int", 6, "number of colour clusters (fewer labels if the image has fewer colours)", 2, 64),
        Param("seed", "int", 0, "seed of the k-means initialisation and pixel subsample", 0, 2**31 - 1),
    ),
)
def segmentation(image: np.ndarray, k: int, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    lab = rgb2lab(image).reshape(-1, 3).astype(np.float32)
    rng = np.random.default_rng(seed)
    fit = lab if len(lab) <= MAX_FIT_PIXELS else lab[rng.choice(len(lab), MAX_FIT_PIXELS, replace=False)]
    unique = np.unique(np.round(fit, 1), axis=0)
    k_eff = min(k, len(unique))
    if k_eff <= 1:
        return np.zeros((h, w), np.uint8)
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 0.1)
    _, _, centres = cv2.kmeans(fit, k_eff, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    labels = np.empty(len(lab), np.int64)
    for s in range(0, len(lab), _CHUNK):
        d = ((lab[s : s + _CHUNK, None, :] - centres[None]) ** 2).sum(-1)
        labels[s : s + _CHUNK] = d.argmin(1)
    used = np.unique(labels)
    order = used[np.lexsort((centres[used, 2], centres[used, 1], centres[used, 0]))]
    lut = np.zeros(k_eff, np.uint8)
    lut[order] = np.arange(len(order), dtype=np.uint8)
    return lut[labels].reshape(h, w)
