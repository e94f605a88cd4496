"""Layer 2, annotate: condition extractors `image -> condition`, usable on any RGB image.

`annotate(kind, image, **params)` runs a registered annotator with validated parameters;
`list_annotators()` describes them all; `from_scene(kind, scene)` gives a Shapes scene's conditions,
exact where the spec defines them (depth, segmentation, edges).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Importing the modules registers their annotators (import order = listing order).
# isort: off
from mmsynth.annotate import edges as _edges  # noqa: F401
from mmsynth.annotate import color as _color  # noqa: F401
from mmsynth.annotate import segmentation as _segmentation  # noqa: F401
from mmsynth.annotate import shuffle as _shuffle  # noqa: F401
from mmsynth.annotate import masks as _masks  # noqa: F401
from mmsynth.annotate import layout as _layout  # noqa: F401
from mmsynth.annotate import depth as _depth  # noqa: F401
# isort: on
from mmsynth.annotate.color import HISTOGRAM_SIZE, LAB_BINS, lab_bin
from mmsynth.annotate.layout import phrase_color
from mmsynth.annotate.registry import AnnotatorSpec, Param, get_annotator, list_annotators
from mmsynth.annotate.scene import SPEC_KINDS, from_scene, scene_kinds


def annotate(kind: str, image: np.ndarray, /, **params: Any) -> np.ndarray:
    """Run annotator `kind` on an HxWx3 uint8 RGB image; parameters are validated (InputError if bad)."""
    return get_annotator(kind)(image, **params)


__all__ = [
    "HISTOGRAM_SIZE",
    "LAB_BINS",
    "SPEC_KINDS",
    "AnnotatorSpec",
    "Param",
    "annotate",
    "from_scene",
    "get_annotator",
    "lab_bin",
    "list_annotators",
    "phrase_color",
    "scene_kinds",
]
