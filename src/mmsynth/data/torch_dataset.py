"""On-the-fly Shapes datasets for training without an export: seeded, infinite or sized, worker-safe.

Every item is a pure function of (split, seed, index): workers need no shared state, and a resumed
run that restarts at index k sees exactly the items it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmsynth.data.annotations import N_CAPTIONS, annotate_scene
from mmsynth.data.captions import captions
from mmsynth.data.render import check_resolution, render
from mmsynth.data.scene import Scene, sample_scene

DEFAULT_MAPS: tuple[str, ...] = ("semantic", "color", "depth", "edges")


def make_example(
    split: str, index: int, seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = DEFAULT_MAPS
) -> dict[str, Any]:
    """One training example as tensors: pixel_values in [-1, 1], one random true caption, condition maps."""
    return example_of_scene(sample_scene(split, index, seed), index, seed, resolution, maps)


def example_of_scene(
    scene: Scene, index: int, seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = DEFAULT_MAPS
) -> dict[str, Any]:
    """`make_example` for a given scene (e.g. an edited one); `index` and `seed` pick its caption."""
    if maps:
        ann = annotate_scene(scene, resolution)
        image, caps = ann.image, ann.records["captions"]
    else:  # no maps asked (clip, vae, t2i): skip the annotations, which cost more than the render itself
        image, caps = render(scene, resolution), captions(scene, N_CAPTIONS)
    pick = int(np.random.default_rng([seed, index, 0xCAB]).integers(len(caps)))
    example: dict[str, Any] = {
        "pixel_values": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0,
        "caption": caps[pick],
        "captions": caps,
        "scene": scene.to_dict(),
        "index": index,
    }
    for name in maps:
        example[name] = torch.from_numpy(ann.maps[name].copy())
    return example


class ShapesDataset(Dataset):
    """Map-style Shapes dataset of `length` items (index i -> scene i of the split)."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        resolution: int = 64,
        length: int = 10_000,
        maps: tuple[str, ...] = DEFAULT_MAPS,
    ):
        self.split, self.seed, self.resolution, self.length, self.maps = (
            split,
            seed,
            check_resolution(resolution),
            length,
            maps,
        )
        sample_scene(split, 0, seed)  # validates split early, with a clear message

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return make_example(self.split, index, self.seed, self.resolution, self.maps)


class ShapesStream(IterableDataset):
    """Infinite stream starting at `start`; DataLoader workers take interleaved indices, never duplicates."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        resolution: int = 64,
        start: int = 0,
        maps: tuple[str, ...] = DEFAULT_MAPS,
    ):
        self.split, self.seed, self.resolution, self.start, self.maps = (
            split,
            seed,
            check_resolution(resolution),
            start,
            maps,
        )
        sample_scene(split, 0, seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + wid
        while True:
            yield make_example(self.split, index, self.seed, self.resolution, self.maps)
            index += nw


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings/dicts as lists (default_collate mangles nested scene dicts)."""
    out: dict[str, Any] = {}
    for key in examples[0]:
        vals = [e[key] for e in examples]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
