"""Training examples by global index, and the batches each process reads at each step.

Data position is a pure function of the step: step s, micro-step m, process r reads the examples
`((s * accum + m) * world + r) * batch + [0, batch)`. A resumed run therefore reads exactly what an
uninterrupted one would, with no sampler state to save, and every process reads different examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from mmsynth.data.annotations import MAP_NAMES
from mmsynth.data.export import read_metadata
from mmsynth.data.torch_dataset import ImageFolderDataset, ShapesDataset, example_of_scene
from mmsynth.errors import InputError
from mmsynth.train.conditions import WithConditions
from mmsynth.train.latent_cache import LatentCacheExamples, is_latent_cache

__all__ = ["HardNegativePairs", "StepBatches", "training_examples"]


class HardNegativePairs(Dataset):
    """On-the-fly Shapes in groups of `group` indices: index g*group is scene g*group and the next group-1 are
    minimal edits of it (one object's shape or colour changed, or two objects swapping places:
    `data.scene.minimal_edit` with `kinds`), so every batch holds scenes that only one caption word, or the
    relation, tells apart. Edits of one scene name different groups (colour, shape, count), so no caption of
    one is true of another. Where no edit keeps the dataset's rules, the index is its own plain scene. Group 2
    (a scene and one edit) is the default, and group g's first edit is the same for every g."""

    def __init__(self, split: str = "train", seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = (),
                 kinds: tuple[str, ...] = ("shape", "colour"), group: int = 2):  # fmt: skip
        if group < 2:
            raise InputError(f"a hard-negative group holds a scene and at least one edit, so group >= 2, got {group}")
        self.plain = ShapesDataset(split, seed, resolution, maps)
        self.kinds, self.group = tuple(kinds), group
        self._last: tuple[int, list[Any]] | None = None  # (first index, scenes): a group's members are drawn together

    def __len__(self) -> int:
        return len(self.plain)

    def _members(self, first: int) -> list[Any]:
        """The scene at `first` and its edits (None where none was found), each edit drawn from its own index's
        stream and redrawn while it names the same groups as an earlier edit."""
        from mmsynth.data.scene import groups, minimal_edit, sample_scene

        if self._last is not None and self._last[0] == first:
            return self._last[1]
        p = self.plain
        scene = sample_scene(p.split, first, p.seed)
        members, named = [scene], []
        for k in range(1, self.group):
            edited = None
            for attempt in range(4):
                stream = [p.seed, first + k, 0xED] + ([attempt] if attempt else [])  # the first draw: as before
                candidate = minimal_edit(scene, np.random.default_rng(stream), kinds=self.kinds)
                if candidate is None:
                    break
                key = sorted((candidate.objects[m[0]].color, candidate.objects[m[0]].shape, len(m))
                             for m in groups(candidate))  # fmt: skip
                if key not in named:
                    edited = candidate
                    named.append(key)
                    break
            members.append(edited)
        self._last = (first, members)
        return members

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, index = self.plain, int(index)
        scene = self._members(index - index % self.group)[index % self.group]
        if scene is None:
            return p[index]
        return example_of_scene(scene, index, p.seed, p.resolution, p.maps)


def training_examples(
    data: str, split: str = "train", seed: int = 0, resolution: int = 64, conditions: tuple[str, ...] = ()
) -> Dataset:
    """`data` is "shapes" (rendered on the fly), an imagefolder directory (the exchange format) or a latent cache;
    `conditions` are the maps a recipe declares (train/conditions.py): the source gives those it has, the rest are
    derived from each example's scene or pixels."""
    examples: Dataset
    if data == "shapes":
        examples = ShapesDataset(split, seed, resolution, maps=tuple(c for c in conditions if c in MAP_NAMES))
    elif not Path(data).is_dir():
        raise InputError(
            f"config key 'data' must be 'shapes', an imagefolder directory or a latent cache; '{data}' is none"
        )
    elif is_latent_cache(data):
        if conditions:
            raise InputError(f"config key 'data': the latent cache '{data}' keeps no images or scenes, so it cannot "
                             f"give the condition maps {', '.join(conditions)}: use 'shapes' or an imagefolder export")
        return LatentCacheExamples(data, seed, resolution, split)
    else:
        columns = ImageFolderDataset.columns(read_metadata(data)[0])
        examples = ImageFolderDataset(data, seed, resolution, maps=tuple(c for c in conditions if c in columns))
    return WithConditions(examples, conditions, resolution) if conditions else examples


class StepBatches(Sampler[list[int]]):
    """Batches of global example indices for one process, from `start_step` to `max_steps`."""

    def __init__(
        self, start_step: int, max_steps: int, batch_size: int, grad_accum: int = 1, world: int = 1, rank: int = 0
    ):
        self.start_step, self.max_steps = start_step, max_steps
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.grad_accum):
                first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
                yield list(range(first, first + self.batch_size))
