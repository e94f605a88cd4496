"""Content shuffle (ControlNet 1.1): a seeded, smooth random flow field scrambles the image.

What survives is the colour/texture content without its layout, which is what a "shuffle" control
transfers. The flow is ControlNet's `make_noise_disk`: coarse uniform noise, cubic upsampling.
"""

from __future__ import annotations

import cv2
import numpy as np

from mmsynth.annotate.registry import Param, register


def _noise_disk(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1] of shape HxW whose features are about `cell` pixels wide."""
    noise = rng.uniform(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    noise = cv2.resize(noise, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell : cell + h, cell : cell + w]
    noise = noise - noise.min()
    peak = float(noise.max())
    return noise / peak if peak > 0 else noise


@register(
    "shuffle",
    "content shuffle: remap through a seeded smooth random flow field (ControlNet), HxWx3 uint8",
    "map",
    (
        Param("seed", "int", 0, "random seed of the flow field", 0, 2**31 - 1),
        Param("scale", "float", 0.5, "flow feature size as a fraction of the longer side (ControlNet: 256/512)",
              0.01, 1.0),
    ),
)
def shuffle(image: np.ndarray, seed: int, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    cell = max(1, round(scale * max(h, w)))
    rng = np.random.default_rng(seed)
    map_x = _noise_disk(h, w, cell, rng) * float(w - 1)
    map_y = _noise_disk(h, w, cell, rng) * float(h - 1)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
