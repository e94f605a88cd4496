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
import torch
from torch.utils.data import Dataset, Sampler

from mmsynth.data.export import read_metadata
from mmsynth.data.torch_dataset import collate, make_example
from mmsynth.errors import InputError
from mmsynth.io import load_image

__all__ = [
    "EpochOrder",
    "HardNegativePairs",
    "ImageFolderExamples",
    "MinedNegatives",
    "ShapesExamples",
    "StepBatches",
    "collate",
    "training_examples",
]


class ShapesExamples(Dataset):
    """On-the-fly Shapes: index i is scene i of the split (never repeats), without condition maps."""

    def __init__(self, split: str = "train", seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = ()):
        from mmsynth.data.scene import sample_scene

        sample_scene(split, 0, seed)  # validate the split now, with a clear message
        self.split, self.seed, self.resolution, self.maps = split, seed, resolution, maps

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        return make_example(self.split, int(index), self.seed, self.resolution, self.maps)


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
        self.plain = ShapesExamples(split, seed, resolution, maps)
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
        from mmsynth.data.torch_dataset import example_of_scene

        p, index = self.plain, int(index)
        scene = self._members(index - index % self.group)[index % self.group]
        if scene is None:
            return p[index]
        return example_of_scene(scene, index, p.seed, p.resolution, p.maps)


class MinedNegatives(Dataset):
    """`HardNegativePairs` groups, each followed by the scenes a trained CLIP confused with its source (a table
    from `train.mining.mine_confusions`, for the same split, seed and group): group g of size group + extra is
    the pairs' group of source `sources[g]` and then that source's first `extra` mined neighbours. Past the
    table's end the groups repeat."""

    def __init__(self, table: dict[str, Any], resolution: int = 64, kinds: tuple[str, ...] = ("shape", "colour"),
                 extra: int = 2):  # fmt: skip
        if not 1 <= extra <= table["neighbours"].shape[1]:
            raise InputError(f"the mined table holds {table['neighbours'].shape[1]} neighbours per source, so "
                             f"the extra members per group must be 1..{table['neighbours'].shape[1]}, got {extra}")
        self.pairs = HardNegativePairs(table["split"], table["seed"], resolution, kinds=kinds, group=table["group"])
        self.sources, self.neighbours = table["sources"], table["neighbours"]
        self.size = table["group"] + extra

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        from mmsynth.data.scene import sample_scene
        from mmsynth.data.torch_dataset import example_of_scene

        g, k = divmod(int(index), self.size)
        row, pairs = g % len(self.sources), self.pairs
        if k < pairs.group:
            return pairs[int(self.sources[row]) + k]
        j = int(self.neighbours[row, k - pairs.group])
        p = pairs.plain
        return example_of_scene(sample_scene(p.split, j, p.seed), j, p.seed, p.resolution, p.maps)


class EpochOrder:
    """Global example index -> row of a finite set: epoch e visits all n rows in a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, index: int) -> int:
        epoch, i = divmod(int(index), self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i])


class ImageFolderExamples(Dataset):
    """An imagefolder export read endlessly: epoch e visits the rows in a permutation seeded by (seed, e)."""

    def __init__(self, folder: str | Path, seed: int = 0, resolution: int = 64):
        self.folder, self.seed, self.resolution = Path(folder), seed, resolution
        self.rows = read_metadata(folder)
        for row in self.rows:
            if not (row.get("caption") or row.get("captions") or row.get("prompt")):
                raise InputError(f"{self.folder}/metadata.jsonl:{row['_line']}: no caption, captions or prompt")
        self._order = EpochOrder(len(self.rows), seed)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[self._order(index)]
        image = load_image(self.folder / row["file_name"], what="training image")
        if image.shape[:2] != (self.resolution, self.resolution):
            raise InputError(
                f"{self.folder / row['file_name']} is {image.shape[1]}x{image.shape[0]}, "
                f"the model expects {self.resolution}x{self.resolution}"
            )
        caps = row.get("captions") or [row.get("caption") or row.get("prompt")]
        pick = int(np.random.default_rng([self.seed, int(index), 0xCAB]).integers(len(caps)))
        return {
            "pixel_values": torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0,
            "caption": caps[pick],
            "captions": caps,
            "scene": row.get("scene"),
            "index": int(index),
        }


def training_examples(data: str, split: str = "train", seed: int = 0, resolution: int = 64) -> Dataset:
    """`data` is "shapes" (rendered on the fly), an imagefolder directory (the exchange format) or a latent cache."""
    from mmsynth.train.latent_cache import LatentCacheExamples, is_latent_cache

    if data == "shapes":
        return ShapesExamples(split, seed, resolution)
    if not Path(data).is_dir():
        raise InputError(
            f"config key 'data' must be 'shapes', an imagefolder directory or a latent cache; '{data}' is none"
        )
    if is_latent_cache(data):
        return LatentCacheExamples(data, seed, resolution, split)
    return ImageFolderExamples(data, seed, resolution)


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
