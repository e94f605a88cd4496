"""A picture of the dataset: each row a scene, its render next to its condition maps and a caption."""

from __future__ import annotations

import numpy as np

from mmsynth.data import vocab
from mmsynth.data.annotations import annotate_scene
from mmsynth.data.scene import sample_scene
from mmsynth.viz import colorize_labels, grid, label, upscale

COLUMNS = ("image", "semantic (shape class)", "color class", "depth (layer)", "edges")
_COLOR_LUT = np.array([(0, 0, 0), *vocab.COLORS.values()], np.uint8)  # colour-class map in its own colours


def dataset_grid(split: str = "train", n: int = 8, seed: int = 0, resolution: int = 64, zoom: int = 2) -> np.ndarray:
    """Grid of `n` scenes: image | semantic | colour | depth | edges, each row titled by its first caption."""
    rows = []
    for index in range(n):
        ann = annotate_scene(sample_scene(split, index, seed), resolution)
        tiles = [
            ann.image,
            colorize_labels(ann.maps["semantic"]),
            _COLOR_LUT[ann.maps["color"]],
            ann.maps["depth"],
            ann.maps["edges"],
        ]
        row = np.concatenate([upscale(t, zoom) for t in tiles], axis=1)
        text = f"{split}[{index}]: {ann.records['captions'][0]}"
        rows.append(label(row, text[:90], height=14))
    body = grid(rows, cols=1, pad=3)
    return label(body, "  " + "  |  ".join(COLUMNS), height=16)
