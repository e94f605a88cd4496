"""Condition maps for training: a recipe declares the maps it needs, the data path supplies them.

A recipe says `conditions = ("canny", "segmentation")` (any kind of `annotate.scene.scene_kinds()`: the exact
Shapes maps, "segmentation", and every registered annotator). For each example, each declared map comes from
the first source that has it:
1. the data itself: a Shapes scene's exact map (`data.annotations.MAP_NAMES`), or an exchange-format folder's
   `<map>_file_name` column (what `mmsynth data export` writes);
2. the example's scene spec (`annotate.scene.from_scene`): exact where the spec knows the map ("segmentation"
   is the semantic map, "layout" draws the spec's boxes), otherwise the annotator on the scene's render;
3. an annotator applied on the fly to the example's pixels (`annotate.registry`), e.g. canny on any image.
So a control recipe trains on exact maps where Shapes has them and on the maps users will extract at sampling
time elsewhere. In a batch a map is a float tensor C x H x W in [0, 1] (uint8 / 255, C = 1 or 3: the layout
of ControlNet's conditioning image); a vector condition (e.g. "histogram") stays the annotator's float vector.
A label map ("segmentation") is colour-coded first (`annotate.network_input`, the rule sampling and the bench
share), as ControlNet's segmentation images are. A 3-channel one (an export's already coded map) is taken as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmsynth.annotate.network_input import as_condition, network_input
from mmsynth.annotate.registry import get_annotator
from mmsynth.annotate.scene import from_scene, scene_kinds
from mmsynth.data.scene import Scene, sample_scene
from mmsynth.errors import InputError


def check_conditions(names: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The declared map names, each a kind the data path can supply (InputError lists the valid ones)."""
    valid = scene_kinds()
    if unknown := [n for n in names if n not in valid]:
        raise InputError(f"{where} declares condition map '{unknown[0]}'; valid maps: {', '.join(valid)}")
    return tuple(names)


def prepared(name: str, value: Any) -> torch.Tensor:
    """Condition `name` as a batch holds it: as a control network sees it (`annotate.network_input`: a label map
    colour-coded), then `as_condition`."""
    return as_condition(network_input(name, value))


def condition_channels(name: str, resolution: int = 64) -> int:
    """Channels of map `name` in a batch (1 or 3), probed on one scene, so a model built for another count is
    refused before training; InputError for a vector condition."""
    value = prepared(name, from_scene(name, sample_scene("train", 0), resolution))
    if value.ndim != 3:
        raise InputError(f"condition '{name}' is a vector ({tuple(value.shape)}), not a map a spatial control takes")
    return int(value.shape[0])


def pixels_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """An example's 3xHxW [-1, 1] pixels back to the HxWx3 uint8 image an annotator takes."""
    return ((pixel_values.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


class WithConditions(Dataset):
    """`examples` with every map in `names` added to each example (sources 2 and 3 above for the maps the data
    lacks), converted by `as_condition`. Runs in the DataLoader's workers, like rendering."""

    def __init__(self, examples: Dataset, names: tuple[str, ...], resolution: int):
        self.examples, self.names, self.resolution = examples, names, resolution

    def __len__(self) -> int:
        return len(self.examples)  # type: ignore[arg-type]

    def derive(self, name: str, example: dict[str, Any]) -> np.ndarray:
        if example.get("scene"):
            return from_scene(name, Scene.from_dict(example["scene"]), self.resolution)
        return get_annotator(name)(pixels_uint8(example["pixel_values"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        for name in self.names:
            example[name] = prepared(name, example[name] if name in example else self.derive(name, example))
        return example
