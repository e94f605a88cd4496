"""Colour conditions: intensity (grey), a coarse colour palette map, and Composer's CIELab histogram.

Composer conditions on colour globally (a 11x5x5 CIELab histogram) and T2I-Adapter's colour adapter
on a spatial palette (downsample by 64, nearest upsample); intensity is Composer's grey-scale condition.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.color import rgb2lab

from mmsynth.annotate.registry import Param, register
from mmsynth.data.vocab import COLOR_NAMES, COLORS

LAB_BINS: tuple[int, int, int] = (11, 5, 5)  # L, a, b (Composer)
LAB_RANGES: tuple[tuple[float, float], ...] = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
HISTOGRAM_SIZE = LAB_BINS[0] * LAB_BINS[1] * LAB_BINS[2]


@register("intensity", "grey-scale intensity (ITU-R BT.601 luma), HxW uint8", "map")
def intensity(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


@register(
    "palette",
    "colour palette: area-downsample to a coarse grid, nearest-upsample back, HxWx3 uint8",
    "map",
    (Param("cells", "int", 8, "grid cells along the shorter side (clamped to the image size)", 1, 512),),
)
def palette(image: np.ndarray, cells: int) -> np.ndarray:
    """Keeps where colours are, drops everything finer than a cell."""
    h, w = image.shape[:2]
    short = min(h, w)
    n = min(cells, short)
    gh, gw = max(1, round(h * n / short)), max(1, round(w * n / short))
    small = cv2.resize(image, (gw, gh), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


@register(
    "color-region",
    "where one named colour is: pixels whose nearest vocabulary colour it is, within max_distance CIELab units; "
    "HxW uint8, 255 = the colour (the mask of an object to recolour)",
    "mask",
    (
        Param("color", "str", "red", "the colour to find", choices=COLOR_NAMES),
        Param("max_distance", "float", 30.0, "largest CIE76 deltaE from the colour's centre", 1.0, 200.0),
    ),
)
def color_region(image: np.ndarray, color: str, max_distance: float) -> np.ndarray:
    """A colour word's pixels: what a prompt-swap recolour edit may change (the rest of the image stays)."""
    lab = rgb2lab(image)
    centres = rgb2lab(np.array([[COLORS[c] for c in COLOR_NAMES]], np.uint8))[0]
    d = np.sqrt(((lab[:, :, None, :] - centres[None, None]) ** 2).sum(-1))
    i = COLOR_NAMES.index(color)
    return ((d.argmin(-1) == i) & (d[..., i] <= max_distance)).astype(np.uint8) * 255


def lab_bin(lab: np.ndarray) -> np.ndarray:
    """Flat histogram bin index of each CIELab triple (..., 3) -> (...), L-major then a then b."""
    idx = []
    for c, (n, (lo, hi)) in enumerate(zip(LAB_BINS, LAB_RANGES)):
        i = np.floor((lab[..., c] - lo) / (hi - lo) * n).astype(np.int64)
        idx.append(np.clip(i, 0, n - 1))
    return (idx[0] * LAB_BINS[1] + idx[1]) * LAB_BINS[2] + idx[2]


@register(
    "histogram",
    "CIELab colour histogram, 11x5x5 = 275 bins (Composer's global colour), float32 summing to 1",
    "vector",
)
def histogram(image: np.ndarray) -> np.ndarray:
    lab = rgb2lab(image)
    counts = np.bincount(lab_bin(lab).ravel(), minlength=HISTOGRAM_SIZE).astype(np.float64)
    return (counts / counts.sum()).astype(np.float32)


def histogram_plot(hist: np.ndarray, bar_width: int = 3, height: int = 200) -> np.ndarray:
    """A bar chart of a Lab histogram for people: one bar per bin, painted in the bin's centre colour."""
    import warnings

    from skimage.color import lab2rgb

    hist = np.asarray(hist, np.float64).ravel()
    if hist.shape != (HISTOGRAM_SIZE,):
        raise ValueError(f"expected a histogram of {HISTOGRAM_SIZE} bins, got {hist.shape}")
    centres = [np.linspace(lo, hi, n + 1)[:-1] + (hi - lo) / n / 2 for n, (lo, hi) in zip(LAB_BINS, LAB_RANGES)]
    lab = np.stack(np.meshgrid(*centres, indexing="ij"), -1).reshape(1, -1, 3)
    with warnings.catch_warnings():  # a few bin centres lie outside sRGB; clipping them is what we want
        warnings.simplefilter("ignore", UserWarning)
        colors = (np.clip(lab2rgb(lab)[0], 0, 1) * 255 + 0.5).astype(np.uint8)
    out = np.full((height, HISTOGRAM_SIZE * bar_width, 3), 255, np.uint8)
    peak = hist.max() if hist.max() > 0 else 1.0
    for i, v in enumerate(hist):
        bar = round(v / peak * (height - 1))
        if bar > 0:
            out[height - bar :, i * bar_width : (i + 1) * bar_width] = colors[i]
    return out
