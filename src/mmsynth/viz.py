"""Small image helpers shared by every layer: grids, label colouring, text labels."""

from __future__ import annotations

import cv2
import numpy as np

# Distinct colours for label maps (index 0 = background, black).
_LABEL_COLORS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]],
    np.uint8,
)  # fmt: skip


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """HxW integer labels -> HxWx3 uint8 with a fixed colour per label (0 stays black)."""
    return _LABEL_COLORS[np.asarray(labels) % len(_LABEL_COLORS)]


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Any HxW or HxWx3 uint8 array as HxWx3 (grayscale repeated)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img.astype(np.uint8)


def label(img: np.ndarray, text: str, height: int = 12) -> np.ndarray:
    """Put a caption strip of `height` pixels above an image (for grids a person reads)."""
    img = to_rgb(img)
    strip = np.full((height, img.shape[1], 3), 255, np.uint8)
    scale = height / 30.0
    cv2.putText(strip, text, (1, height - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, img], axis=0)


def grid(images: list[np.ndarray], cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile same-size images row-major into one uint8 image with `pad` pixels between them."""
    if not images:
        raise ValueError("grid needs at least one image")
    tiles = [to_rgb(i) for i in images]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale, so small renders stay crisp in docs."""
    return np.repeat(np.repeat(to_rgb(img), factor, axis=0), factor, axis=1)
