"""Random inpainting masks: filled boxes and free-form brush strokes (LaMa / SD-inpainting style).

Seeded so that a training batch or a benchmark case is reproducible. 255 marks the region to repaint.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from mmsynth.annotate.registry import Param, register

MASK_KINDS: tuple[str, ...] = ("box", "brush", "mixed")


def _box(mask: np.ndarray, rng: np.random.Generator, max_size: float) -> None:
    h, w = mask.shape
    bw = max(1, round(rng.uniform(0.1, max(max_size, 0.1)) * w))
    bh = max(1, round(rng.uniform(0.1, max(max_size, 0.1)) * h))
    x0 = int(rng.integers(0, w - bw + 1))
    y0 = int(rng.integers(0, h - bh + 1))
    mask[y0 : y0 + bh, x0 : x0 + bw] = 255


def _brush(mask: np.ndarray, rng: np.random.Generator, max_size: float) -> None:
    h, w = mask.shape
    short = min(h, w)
    width = max(1, round(rng.uniform(0.03, 0.12) * short))
    x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
    angle = rng.uniform(0, 2 * math.pi)
    for _ in range(int(rng.integers(3, 9))):
        angle += rng.uniform(-math.pi / 2, math.pi / 2)
        length = rng.uniform(0.05, max_size) * short
        nx = float(np.clip(x + length * math.cos(angle), 0, w - 1))
        ny = float(np.clip(y + length * math.sin(angle), 0, h - 1))
        cv2.line(mask, (round(x), round(y)), (round(nx), round(ny)), 255, width, lineType=cv2.LINE_8)
        cv2.circle(mask, (round(nx), round(ny)), max(1, width // 2), 255, -1)
        x, y = nx, ny


@register(
    "mask",
    "random inpainting mask of boxes and/or brush strokes, seeded; HxW uint8, 255 = repaint",
    "mask",
    (
        Param("kind", "str", "mixed", "box: filled rectangles, brush: free-form strokes, mixed: either",
              choices=MASK_KINDS),
        Param("seed", "int", 0, "random seed", 0, 2**31 - 1),
        Param("count", "int", 2, "number of boxes/strokes", 1, 32),
        Param("max_size", "float", 0.5, "largest box side / stroke segment as a fraction of the image", 0.05, 1.0),
    ),
)
def mask(image: np.ndarray, kind: str, seed: int, count: int, max_size: float) -> np.ndarray:
    """Only the image's size is used: masks are independent of content."""
    out = np.zeros(image.shape[:2], np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        k = kind if kind != "mixed" else ("box", "brush")[int(rng.integers(0, 2))]
        (_box if k == "box" else _brush)(out, rng, max_size)
    return out
