"""Depth: there is no weight-free monocular depth estimator, so depth of an arbitrary image is refused.

For Shapes scenes the exact depth map comes from the spec (see `mmsynth.annotate.from_scene`).
"""

from __future__ import annotations

import numpy as np

from mmsynth.annotate.registry import register
from mmsynth.errors import InputError

DEPTH_UNAVAILABLE = (
    "depth cannot be estimated from an arbitrary image here: it needs a Shapes scene spec "
    "(mmsynth.annotate.from_scene('depth', scene) or `mmsynth annotate depth --scene SCENE.json`) "
    "or a user-supplied depth model, and none ships with mmsynth"
)


@register("depth", "depth by layer (nearer is brighter); only from a Shapes scene spec (--scene)", "map")
def depth(image: np.ndarray) -> np.ndarray:
    raise InputError(DEPTH_UNAVAILABLE)
